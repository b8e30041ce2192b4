"""The local daemon's status (`vmswarm status`) as plain lines or as rich tables."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from .output import human_bytes, rich_table


def _where(address: Any) -> str:
    return "-" if not address else f"{address[0]}:{address[1]}"


def _headline(status: dict[str, Any]) -> str:
    tracker = status.get("tracker") or {}
    state = "connected" if tracker.get("connected") else f"away: {tracker.get('last_error')}"
    return (
        f"{status.get('role')} daemon {status.get('peer_id')} on {_where(status.get('listen'))}, "
        f"tracker {tracker.get('address')} ({state}), "
        f"{status.get('connections')}/{status.get('max_peers')} connections"
    )


def status_lines(status: dict[str, Any]) -> list[str]:
    """Plain text: a headline, then a line per template with its peers and bans under it."""
    lines = [_headline(status)]
    templates = status.get("templates") or []
    if not templates:
        lines.append("  no templates")
    for t in templates:
        lines.append(
            f"  {t['name']}:{t['version']} {t['template_id'][:16]}  {t['percent']:.1f}%"
            f"{' complete' if t.get('complete') else ''}  "
            f"down {human_bytes(t['rate'])}/s  up {human_bytes(t['upload_rate'])}/s  "
            f"from centers {human_bytes(t['bytes_from_centers'])}  "
            f"from peers {human_bytes(t['bytes_from_peers'])}  "
            f"{t['links']} peers"
        )
        for p in t.get("peers", []):
            where = _where(p.get("listen") or p.get("address"))
            lines.append(
                f"    peer {p['peer_id'][:16]} {p['role']:<7} {where:<21} {p['direction']:<3} "
                f"{p['percent']:5.1f}%  in {human_bytes(p['bytes_in'])}  "
                f"out {human_bytes(p['bytes_out'])}"
            )
        for b in t.get("banned", []):
            lines.append(
                f"    banned {b['peer_id'][:16]} {_where(b.get('address'))}: {b['reason']} "
                f"({b['corrupt_chunks']} corrupt chunks)"
            )
    return lines


def status_renderable(status: dict[str, Any]) -> RenderableType:
    """For a terminal: the headline, a table of templates, and each template's peers and bans."""
    parts: list[RenderableType] = [Text(_headline(status), style="bold")]
    templates = status.get("templates") or []
    if not templates:
        parts.append(Text("no templates"))
        return Group(*parts)
    parts.append(
        rich_table(
            ["TEMPLATE", "ID", "DONE", "DOWN", "UP", "FROM CENTERS", "FROM PEERS", "PEERS"],
            [
                [
                    f"{t['name']}:{t['version']}",
                    t["template_id"][:16],
                    f"{t['percent']:.1f}%" + (" complete" if t.get("complete") else ""),
                    f"{human_bytes(t['rate'])}/s",
                    f"{human_bytes(t['upload_rate'])}/s",
                    human_bytes(t["bytes_from_centers"]),
                    human_bytes(t["bytes_from_peers"]),
                    str(t["links"]),
                ]
                for t in templates
            ],
            right={"DONE", "DOWN", "UP", "FROM CENTERS", "FROM PEERS", "PEERS"},
        )
    )
    for t in templates:
        label = f"{t['name']}:{t['version']}"
        if t.get("peers"):
            parts.append(
                rich_table(
                    ["PEER", "ROLE", "ADDRESS", "DIR", "HAS", "IN", "OUT"],
                    [
                        [
                            p["peer_id"][:16],
                            p["role"],
                            _where(p.get("listen") or p.get("address")),
                            p["direction"],
                            f"{p['percent']:.1f}%",
                            human_bytes(p["bytes_in"]),
                            human_bytes(p["bytes_out"]),
                        ]
                        for p in t["peers"]
                    ],
                    right={"HAS", "IN", "OUT"},
                    title=f"peers of {label}",
                )
            )
        if t.get("banned"):
            parts.append(
                rich_table(
                    ["BANNED PEER", "ADDRESS", "CORRUPT CHUNKS", "REASON"],
                    [
                        [
                            b["peer_id"][:16],
                            _where(b.get("address")),
                            str(b["corrupt_chunks"]),
                            b["reason"],
                        ]
                        for b in t["banned"]
                    ],
                    right={"CORRUPT CHUNKS"},
                    title=f"banned from {label}",
                )
            )
    return Group(*parts)
