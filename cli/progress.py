"""Fetch progress on stderr: a live bar on a terminal, a plain line now and then otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.progress import BarColumn, Progress, TaskID, TextColumn

from .output import console, human_bytes, is_terminal

# Without a terminal, progress is one line this often.
PLAIN_PROGRESS_EVERY = 3.0


def progress_text(data: dict[str, Any]) -> str:
    eta = data.get("eta")
    return (
        f"{human_bytes(float(data.get('rate', 0.0)))}/s  "
        f"ETA {'--' if eta is None else f'{float(eta):.0f}s'}  "
        f"sources {data.get('sources', 0)}  "
        f"centers {human_bytes(int(data.get('bytes_from_centers', 0)))}  "
        f"peers {human_bytes(int(data.get('bytes_from_peers', 0)))}"
    )


class ProgressView:
    """Takes the daemon's `progress` notices; call finish() when the fetch ends either way."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = is_terminal(sys.stderr)
        self._last_plain: float | None = None
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event != "progress":
            return
        done = int(data.get("done_bytes", 0))
        total = int(data.get("total_bytes", 0))
        if self.tty:
            self._draw(done, total, progress_text(data))
            return
        now = time.monotonic()
        if self._last_plain is None or now - self._last_plain >= PLAIN_PROGRESS_EVERY:
            self._last_plain = now
            percent = 100.0 if total == 0 else 100.0 * done / total
            sys.stderr.write(f"{self.label}: {percent:5.1f}%  {progress_text(data)}\n")
            sys.stderr.flush()

    def _draw(self, done: int, total: int, text: str) -> None:
        if self._bar is None:
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>5.1f}%"),
                TextColumn("{task.fields[detail]}"),
                console=console(sys.stderr),
                auto_refresh=False,  # redrawn on each notice: no refresh thread
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=max(total, 1), detail=text)
        assert self._task is not None
        self._bar.update(self._task, completed=done, total=max(total, 1), detail=text)
        self._bar.refresh()

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


__all__ = ["PLAIN_PROGRESS_EVERY", "ProgressView", "progress_text"]
