"""qemu-nbd serving an image read-only on a Unix socket: a stand-in for the host's own export."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path


class NbdServer:
    """qemu-nbd serving a file read-only on a Unix socket, until stopped."""

    def __init__(self, image: Path, socket: Path) -> None:
        self.socket = socket
        self.process = subprocess.Popen(
            ["qemu-nbd", "-r", "-t", "-k", str(socket), "-f", "raw", str(image)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(400):
            if socket.exists() or self.process.poll() is not None:
                break
            time.sleep(0.05)
        if not socket.exists():
            self.stop()
            raise AssertionError(f"qemu-nbd did not serve {image} (exit {self.process.poll()})")
        socket.chmod(0o666)  # qemu connects as libvirt-qemu

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
