"""One libtorrent node of the cluster benchmark: a seed or a leecher, in its own namespace.

Run: python -m bench.cluster.lt_peer seed|leech --torrent T --save DIR --listen IP:PORT
     --state DIR [--peer IP:PORT ...] [--go FILE]
TCP only (no uTP, DHT, LSD, UPnP, NAT-PMP or encryption); seeds start from libtorrent's
`high_performance_seed` preset in seed mode; peers are added directly (no tracker). Files in
--state talk to the benchmark: `ready` when listening (a leecher then waits for --go), `done.json`
when a leecher has every piece hash-checked, `final.json` after `stop` appears. Finished leechers
keep uploading until then, as BitTorrent clients do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from vmswarm.daemon.cluster import die_with_parent, peak_rss_bytes

from bench.libtorrent_baseline import import_libtorrent

_POLL_MS = 20
_RECONNECT_EVERY = 1.0
_PROGRESS_EVERY = 0.5


def settings(lt: Any, listen: str, *, seed: bool) -> dict[str, Any]:
    """TCP-only settings on one address; seeds from the high-performance preset."""
    base: dict[str, Any] = dict(lt.high_performance_seed()) if seed else {}
    base.update(
        {
            "listen_interfaces": listen,
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_outgoing_utp": False,
            "enable_incoming_utp": False,
            "enable_outgoing_tcp": True,
            "enable_incoming_tcp": True,
            "out_enc_policy": int(lt.enc_policy.pe_disabled),
            "in_enc_policy": int(lt.enc_policy.pe_disabled),
            "alert_mask": int(lt.alert.category_t.error_notification),
        }
    )
    return base


def _write_json(path: Path, value: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def run(args: argparse.Namespace) -> None:
    lt = import_libtorrent()
    seed = args.role == "seed"
    state: Path = args.state
    state.mkdir(parents=True, exist_ok=True)
    session = lt.session(settings(lt, args.listen, seed=seed))
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(str(args.torrent))
    params.save_path = str(args.save)
    if seed:
        # seed_mode: no up-front check; a piece is hashed the first time it is uploaded.
        params.flags = params.flags | int(lt.torrent_flags.seed_mode)
    handle = session.add_torrent(params)
    peers = [_address(p) for p in args.peer]
    while session.listen_port() == 0 or (seed and not handle.status().is_seeding):
        session.wait_for_alert(_POLL_MS)
        session.pop_alerts()
    _write_json(state / "ready", {"port": session.listen_port(), "pid": os.getpid()})
    if not seed:
        while not args.go.exists():
            time.sleep(0.002)
        for peer in peers:
            handle.connect_peer(peer)
    last_connect = last_progress = time.monotonic()
    progress: list[tuple[float, int]] = []
    done = seed
    stop = state / "stop"
    while not stop.exists():
        status = handle.status()
        if status.errc.value() != 0:
            raise RuntimeError(f"torrent error: {status.errc.message()}")
        now = time.monotonic()
        if not done and now - last_progress >= _PROGRESS_EVERY:
            progress.append((now, int(status.total_wanted_done)))
            last_progress = now
        if not done and status.is_finished:
            done = True
            _write_json(
                state / "done.json",
                {
                    "finished": now,
                    "downloaded_payload": status.total_payload_download,
                    "uploaded_payload": status.total_payload_upload,
                    "progress": progress,
                },
            )
        # A connect issued before the other side listened is dropped; try the missing ones again.
        if peers and status.num_peers < len(peers) and now - last_connect > _RECONNECT_EVERY:
            for peer in peers:
                handle.connect_peer(peer)
            last_connect = now
        session.wait_for_alert(_POLL_MS)
        session.pop_alerts()
    status = handle.status()
    _write_json(
        state / "final.json",
        {
            "downloaded_payload": status.total_payload_download,
            "uploaded_payload": status.total_payload_upload,
            "peak_rss_bytes": peak_rss_bytes(os.getpid()),
        },
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("role", choices=["seed", "leech"])
    parser.add_argument("--torrent", type=Path, required=True)
    parser.add_argument("--save", type=Path, required=True)
    parser.add_argument("--listen", required=True, help="IP:PORT")
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--peer", action="append", default=[], help="IP:PORT to connect to")
    parser.add_argument("--go", type=Path, default=None, help="leechers start when it exists")
    args = parser.parse_args(argv)
    if args.role == "leech" and args.go is None:
        parser.error("a leecher needs --go")
    die_with_parent()
    run(args)


if __name__ == "__main__":
    main()
    sys.exit(0)
