"""What a template's swarm reports as it moves chunks: the hook the metrics hang on.

The base class ignores everything, so a download without metrics pays one method call per chunk.
"""

from __future__ import annotations

from ..swarm.messages import Role


def role_label(role: Role) -> str:
    """The metrics' name for a peer's role: `center` or `host`."""
    return "center" if role is Role.STORAGE else "host"


class TransferEvents:
    """Called from the owner task of each `TemplateDownload` (never from a worker thread)."""

    def chunk_verified(self, template: str, role: str, size: int, latency: float | None) -> None:
        """A chunk from a peer of `role` verified and written; `latency` from first request."""

    def chunk_failed(self, template: str, role: str) -> None:
        """A chunk from a peer of `role` failed verification."""

    def peer_banned(self, template: str, role: str, reason: str = "corrupt_chunk") -> None:
        """A peer of `role` was banned for `reason` (one of bans.BAN_REASONS)."""

    def connection_dropped(self, reason: str) -> None:
        """A connection was refused or cut for `reason` (a limit, a ban or a timeout)."""

    def chunk_sent(self, template: str, role: str, size: int) -> None:
        """A chunk of `size` bytes went to a peer of `role`."""

    def template_complete(self, template: str, seconds: float) -> None:
        """Every chunk is here and the whole image verified, `seconds` after the fetch began."""
