"""Parse and print HOST:PORT addresses the way operators type them."""

from __future__ import annotations


def parse_address(text: str) -> tuple[str, int]:
    """Turn "127.0.0.1:7000", "[::1]:7000" or "name:7000" into (host, port); ValueError if bad."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"address {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"address {text!r}: write IPv6 hosts in brackets, like [::1]:7000")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"address {text!r}: port must be a number in 0..65535")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
