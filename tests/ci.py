"""What a test does without a tool it needs: skip on a developer's machine, fail under CI."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(must: str, reason: str) -> NoReturn:
    """Skip for `reason`; under CI (where the test must `must`, e.g. "test a full disk"), fail."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must {must}, but {reason}")
    pytest.skip(reason)
