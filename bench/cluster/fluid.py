"""The fluid lower bound on distribution time (Kumar & Ross 2006; Kurose & Ross, §2.5). Pure.

For a file of F bytes, servers with total upload u_s, N hosts with download rates d_i and upload
rates u_i (bytes/s), no schedule can finish before
    T_min = max(F / u_s, F / d_min, N·F / (u_s + Σu_i)).
With peers off the hosts upload nothing, so Σu_i = 0 and the last term is N·F / u_s.
"""

from __future__ import annotations

from collections.abc import Sequence

# TCP payload per 1500-byte IP packet with timestamps (1448) over what htb counts (1514 with the
# Ethernet header): the fraction of a shaped link's rate that carries file bytes.
TCP_PAYLOAD_FRACTION = 1448 / 1514


def t_min(
    size: float, server_upload: float, downloads: Sequence[float], uploads: Sequence[float]
) -> float:
    """Seconds, the fluid bound for `len(downloads)` hosts; rates in bytes per second."""
    n = len(downloads)
    if n == 0:
        raise ValueError("the bound needs at least one host")
    if len(uploads) != n:
        raise ValueError(f"{n} download rates but {len(uploads)} upload rates")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if server_upload <= 0 or min(downloads) <= 0 or min(uploads) < 0:
        raise ValueError("server upload and host downloads must be > 0, host uploads >= 0")
    return max(
        size / server_upload, size / min(downloads), n * size / (server_upload + sum(uploads))
    )


def t_min_uniform(
    size: float, hosts: int, servers: int, link_rate: float, *, peers: bool = True
) -> float:
    """The bound when every server and host link runs at `link_rate` bytes/s in each direction."""
    uploads = [link_rate if peers else 0.0] * hosts
    return t_min(size, servers * link_rate, [link_rate] * hosts, uploads)


def payload_rate(rate_bits: float) -> float:
    """Bytes of file per second that a link shaped to `rate_bits` bit/s carries over TCP."""
    return rate_bits / 8 * TCP_PAYLOAD_FRACTION


__all__ = ["TCP_PAYLOAD_FRACTION", "payload_rate", "t_min", "t_min_uniform"]
