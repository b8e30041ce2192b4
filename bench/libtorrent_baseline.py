"""Baseline: libtorrent 2.x moves one image from one seeder to one leecher over loopback.

Run: python -m bench.libtorrent_baseline [--size 1GiB] [--piece-size 4MiB] [--timeout 600]
TCP only (no uTP), no DHT/LSD/UPnP/NAT-PMP/encryption, the seeder tuned with
`high_performance_seed()`, the leecher told the seeder's address directly (`connect_peer`).
Seeder and leecher run in separate processes, like vmswarm's two daemons, so both cores work.
Timed: from the leecher's add_torrent until libtorrent reports it finished (every piece
hash-checked). libtorrent sends zero regions like any other data; vmswarm skips all-zero chunks.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import queue
import re
import shutil
import tempfile
import time
import traceback
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import blake3
from vmswarm.daemon.cluster import die_with_parent, peak_rss_bytes
from vmswarm.daemon.mixed_image import write_mixed_image

from bench.report import emit

DEFAULT_PIECE_SIZE = 4 << 20
DEFAULT_TIMEOUT = 600.0
LOOPBACK = "127.0.0.1"
COLUMNS = [
    "tool",
    "size",
    "piece_size",
    "seconds",
    "MB/s",
    "payload_bytes",
    "seeder_peak_rss_MiB",
    "leecher_peak_rss_MiB",
    "identical",
]
_POLL_MS = 50
_UNITS = {
    **{"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30},
    **{"KB": 10**3, "MB": 10**6, "GB": 10**9},
}


def import_libtorrent() -> Any:
    """The libtorrent module (untyped C++ bindings), or an ImportError that says how to get it."""
    try:
        return importlib.import_module("libtorrent")
    except ImportError as exc:
        raise ImportError(
            f"libtorrent is not importable ({exc}); install it with: pip install 'vmswarm[bench]'"
        ) from exc


def _session_settings(lt: Any, *, seeder: bool) -> dict[str, Any]:
    """Loopback-only TCP settings; the seeder starts from libtorrent's high-performance preset."""
    settings: dict[str, Any] = dict(lt.high_performance_seed()) if seeder else {}
    settings.update(
        {
            "listen_interfaces": f"{LOOPBACK}:0",
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_outgoing_utp": False,
            "enable_incoming_utp": False,
            "enable_outgoing_tcp": True,
            "enable_incoming_tcp": True,
            # vmswarm does not encrypt either; RC4 would only measure the cipher.
            "out_enc_policy": int(lt.enc_policy.pe_disabled),
            "in_enc_policy": int(lt.enc_policy.pe_disabled),
            "alert_mask": int(lt.alert.category_t.error_notification)
            | int(lt.alert.category_t.status_notification),
        }
    )
    return settings


def _add_params(lt: Any, torrent: Path, save_path: Path, flags: int = 0) -> Any:
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(str(torrent))
    params.save_path = str(save_path)
    params.flags = params.flags | flags
    return params


def _wait_for(condition: Any, deadline: float, what: str) -> None:
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"libtorrent {what} did not happen in time")
        time.sleep(_POLL_MS / 1000)


def _seeder_main(
    torrent: Path,
    save_path: Path,
    seed_mode: bool,
    timeout: float,
    results: Queue[tuple[str, Any]],
    stop: Event,
) -> None:
    """Seed until told to stop, then report upload figures and peak RSS."""
    die_with_parent()
    try:
        lt = import_libtorrent()
        deadline = time.monotonic() + timeout
        session = lt.session(_session_settings(lt, seeder=True))
        # seed_mode skips the up-front full check; pieces are hashed on first upload instead.
        flags = int(lt.torrent_flags.seed_mode) if seed_mode else 0
        handle = session.add_torrent(_add_params(lt, torrent, save_path, flags))
        _wait_for(lambda: handle.status().is_seeding, deadline, "seeder reaching seeding state")
        _wait_for(lambda: session.listen_port() > 0, deadline, "seeder listening")
        results.put(("seeder-ready", session.listen_port()))
        stop.wait(max(0.0, deadline - time.monotonic()))
        status = handle.status()
        results.put(
            (
                "seeder-done",
                {
                    "uploaded_payload": status.total_payload_upload,
                    "peak_rss_bytes": peak_rss_bytes(os.getpid()),
                },
            )
        )
    except BaseException:
        results.put(("error", f"seeder failed:\n{traceback.format_exc()}"))
        raise


def _leecher_main(
    torrent: Path,
    save_path: Path,
    seeder_port: int,
    timeout: float,
    results: Queue[tuple[str, Any]],
) -> None:
    """Download from the seeder; time add_torrent → finished (all pieces hash-checked)."""
    die_with_parent()
    try:
        lt = import_libtorrent()
        session = lt.session(_session_settings(lt, seeder=False))
        params = _add_params(lt, torrent, save_path)
        start = time.perf_counter()
        deadline = time.monotonic() + timeout
        handle = session.add_torrent(params)
        handle.connect_peer((LOOPBACK, seeder_port))
        last_connect = time.monotonic()
        while True:
            status = handle.status()
            if status.is_finished:
                break
            if status.errc.value() != 0:
                raise RuntimeError(f"leecher torrent error: {status.errc.message()}")
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(
                    f"leecher not finished after {timeout}s: {status.progress:.1%} done, "
                    f"{status.num_peers} peers, state {status.state}"
                )
            # A connect issued while the torrent was still checking may be dropped; retry.
            if status.num_peers == 0 and now - last_connect > 1.0:
                handle.connect_peer((LOOPBACK, seeder_port))
                last_connect = now
            session.wait_for_alert(_POLL_MS)
            session.pop_alerts()
        seconds = time.perf_counter() - start
        results.put(
            (
                "leecher-done",
                {
                    "seconds": seconds,
                    "downloaded_payload": status.total_payload_download,
                    "downloaded_total": status.total_download,
                    "peak_rss_bytes": peak_rss_bytes(os.getpid()),
                },
            )
        )
    except BaseException:
        results.put(("error", f"leecher failed:\n{traceback.format_exc()}"))
        raise


def make_torrent(image_path: Path, torrent_path: Path, piece_size: int) -> int:
    """Write a v1 torrent for one file (no trackers); returns the piece count."""
    lt = import_libtorrent()
    if hasattr(lt, "list_files"):
        files = lt.list_files(str(image_path))
    else:  # libtorrent < 2.1
        files = lt.file_storage()
        lt.add_files(files, str(image_path))
    # v1 only: SHA-1 per piece, the cheapest hashing libtorrent offers, so the baseline is strong.
    creator = lt.create_torrent(files, piece_size, lt.create_torrent.v1_only)
    creator.set_priv(True)
    lt.set_piece_hashes(creator, str(image_path.parent))
    torrent_path.write_bytes(lt.bencode(creator.generate()))
    return int(creator.num_pieces())


def _await(
    results: Queue[tuple[str, Any]],
    kind: str,
    deadline: float,
    watched: list[SpawnProcess],
) -> Any:
    """The next message, which must be `kind`; fail clearly on errors, deaths and timeouts."""
    while True:
        try:
            tag, payload = results.get(timeout=0.2)
        except queue.Empty:
            for process in watched:
                if process.exitcode is not None and process.exitcode != 0:
                    raise RuntimeError(
                        f"{process.name} exited with code {process.exitcode} before {kind}"
                    ) from None
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {kind} from the libtorrent processes in time") from None
            continue
        if tag == "error":
            raise RuntimeError(str(payload))
        if tag != kind:
            raise RuntimeError(f"expected {kind}, got {tag}")
        return payload


def _file_digest(path: Path) -> bytes:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            hasher.update(block)
    digest: bytes = hasher.digest()
    return digest


def run_libtorrent_transfer(
    image_path: Path,
    workdir: Path,
    *,
    piece_size: int = DEFAULT_PIECE_SIZE,
    timeout: float = DEFAULT_TIMEOUT,
    seed_mode: bool = True,
) -> dict[str, Any]:
    """Move `image_path` seeder → leecher over loopback TCP with libtorrent; figures as a dict.

    MB/s uses MB = 10**6 bytes of image size. Every wait is bounded by `timeout` seconds.
    """
    lt = import_libtorrent()
    size = image_path.stat().st_size
    if size == 0:
        raise ValueError(f"{image_path} is empty; libtorrent cannot make a torrent of it")
    workdir.mkdir(parents=True, exist_ok=True)
    torrent = workdir / "image.torrent"
    pieces = make_torrent(image_path, torrent, piece_size)
    leech_dir = workdir / "leecher"
    shutil.rmtree(leech_dir, ignore_errors=True)
    leech_dir.mkdir()

    context = multiprocessing.get_context("spawn")
    results: Queue[tuple[str, Any]] = context.Queue()
    stop = context.Event()
    deadline = time.monotonic() + timeout
    seeder = context.Process(
        target=_seeder_main,
        args=(torrent, image_path.parent, seed_mode, timeout, results, stop),
        name="libtorrent-seeder",
        daemon=True,
    )
    leecher: SpawnProcess | None = None
    try:
        seeder.start()
        port = int(_await(results, "seeder-ready", deadline, [seeder]))
        leecher = context.Process(
            target=_leecher_main,
            args=(torrent, leech_dir, port, timeout, results),
            name="libtorrent-leecher",
            daemon=True,
        )
        leecher.start()
        leeched = _await(results, "leecher-done", deadline, [seeder, leecher])
        stop.set()
        seeded = _await(results, "seeder-done", deadline, [seeder])
    finally:
        stop.set()
        for process in (leecher, seeder):
            if process is not None and process.pid is not None:
                process.join(timeout=10)
                if process.is_alive():
                    process.kill()
                    process.join(timeout=10)
        results.close()

    downloaded = leech_dir / image_path.name
    seconds = float(leeched["seconds"])
    return {
        "tool": "libtorrent",
        "version": str(lt.__version__),
        "size": size,
        "piece_size": piece_size,
        "pieces": pieces,
        "seconds": seconds,
        "mb_per_s": size / seconds / 1e6 if seconds > 0 else float("inf"),
        "payload_bytes": int(leeched["downloaded_payload"]),
        "wire_bytes": int(leeched["downloaded_total"]),
        "uploaded_payload": int(seeded["uploaded_payload"]),
        "seeder_peak_rss_bytes": int(seeded["peak_rss_bytes"]),
        "leecher_peak_rss_bytes": int(leeched["peak_rss_bytes"]),
        "identical": downloaded.exists() and _file_digest(downloaded) == _file_digest(image_path),
        "seed_mode": seed_mode,
        "transport": "tcp",
    }


def parse_size(text: str) -> int:
    """'1GiB', '256MiB', '4 MiB', '1000000' → bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"cannot parse size {text!r} (examples: 1GiB, 256MiB, 4096)")
    return int(match.group(1)) * _UNITS[(match.group(2) or "").upper()]


def table_row(figures: dict[str, Any]) -> dict[str, Any]:
    """The figures in the benchmark table's columns."""
    return {
        "tool": f"libtorrent {figures['version']}",
        "size": figures["size"],
        "piece_size": figures["piece_size"],
        "seconds": figures["seconds"],
        "MB/s": figures["mb_per_s"],
        "payload_bytes": figures["payload_bytes"],
        "seeder_peak_rss_MiB": figures["seeder_peak_rss_bytes"] / (1 << 20),
        "leecher_peak_rss_MiB": figures["leecher_peak_rss_bytes"] / (1 << 20),
        "identical": figures["identical"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--piece-size", type=parse_size, default=DEFAULT_PIECE_SIZE)
    parser.add_argument("--zero-fraction", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--no-seed-mode", action="store_true", help="full check before seeding")
    parser.add_argument("--workdir", type=Path, default=None, help="kept if given")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmswarm-bench-lt-"))
    try:
        image = workdir / "seeder" / "image.raw"
        image.parent.mkdir(parents=True, exist_ok=True)
        write_mixed_image(image, args.size, zero_fraction=args.zero_fraction)
        figures = run_libtorrent_transfer(
            image,
            workdir,
            piece_size=args.piece_size,
            timeout=args.timeout,
            seed_mode=not args.no_seed_mode,
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    emit(
        "libtorrent_baseline",
        [table_row(figures)],
        COLUMNS,
        {"figures": figures, "zero_fraction": args.zero_fraction},
    )


if __name__ == "__main__":
    main()
