"""atheris is a dev dependency: without it these tests skip, except under CI, where they fail."""

from __future__ import annotations

import importlib.util
import os

import pytest

HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None
REASON = "atheris is not installed (pip install -e '.[dev]')"

# These modules import atheris; under CI a failed import is the failure we want.
collect_ignore = [] if HAVE_ATHERIS or os.environ.get("CI") else ["test_fuzz_inputs.py"]


@pytest.fixture(autouse=True)
def _need_atheris() -> None:
    if not HAVE_ATHERIS:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the fuzzer, but {REASON}")
        pytest.skip(REASON)
