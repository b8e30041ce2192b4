"""`vmswarm daemon run`, `vmswarm fetch` and `vmswarm status`: the daemon and its local control."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import trio
import typer

from ..daemon.config_files import ConfigError, load_flavors
from ..daemon.control import ControlError, ControlUnreachable, call_control
from ..daemon.download import DownloadConfig
from ..daemon.node import NodeConfig, NodeError, run_until_signalled
from ..daemon.ratelimit import parse_rate
from ..daemon.rpc import RpcError
from ..daemon.storeerrors import StoreError
from ..swarm.address import parse_address
from ..swarm.messages import Role
from .output import fail, human_bytes, print_json

ENV_TRACKER = "VMSWARM_TRACKER"
ENV_CONTROL = "VMSWARM_CONTROL"
DEFAULT_CONTROL = Path("/var/lib/vmswarm/control.sock")
# Without a terminal, progress is one line this often.
PLAIN_PROGRESS_EVERY = 3.0

daemon_app = typer.Typer(
    name="daemon", help="Run the host or storage-center daemon.", no_args_is_help=True
)

ControlOption = Annotated[
    Path | None,
    typer.Option(
        "--control",
        envvar=ENV_CONTROL,
        help=f"The daemon's control socket [default: ${ENV_CONTROL}, else {DEFAULT_CONTROL}]",
        show_default=False,
    ),
]


def _address(text: str, what: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        fail(f"{what}: {exc}")


def _first_error(exc: BaseException) -> BaseException:
    """The first leaf of a (possibly nested) exception group."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


@daemon_app.command("run")
def daemon_run(
    role: Annotated[str, typer.Option("--role", help="host or storage")],
    data_dir: Annotated[Path, typer.Option("--data-dir", help="Where stores and ids live")],
    tracker: Annotated[
        str | None,
        typer.Option("--tracker", envvar=ENV_TRACKER, help="Tracker HOST:PORT"),
    ] = None,
    listen: Annotated[
        str, typer.Option("--listen", help="TCP HOST:PORT for peers and RPC")
    ] = "0.0.0.0:7881",
    control: Annotated[
        Path | None,
        typer.Option("--control", help="Control socket [default: DATA_DIR/control.sock]"),
    ] = None,
    rack: Annotated[str | None, typer.Option("--rack", help="Rack label for locality")] = None,
    max_peers: Annotated[int, typer.Option("--max-peers", min=1, help="Connection cap")] = 64,
    upload_slots: Annotated[
        int, typer.Option("--upload-slots", min=1, help="Chunks uploaded at once")
    ] = 8,
    upload_limit: Annotated[
        str,
        typer.Option(
            "--upload-limit",
            help="Upload rate cap shared by all peers, e.g. 20MB, 100Mbit (0: unlimited)",
        ),
    ] = "0",
    no_source_timeout: Annotated[
        float,
        typer.Option(
            "--no-source-timeout",
            min=0.1,
            help="Seconds a wanted chunk may have no source before a fetch fails",
        ),
    ] = 30.0,
    flavors_file: Annotated[
        Path | None,
        typer.Option("--flavors", help="Flavors TOML file [default: built-in tiny/small/medium]"),
    ] = None,
    libvirt_uri: Annotated[
        str,
        typer.Option(
            "--libvirt-uri",
            envvar="VMSWARM_LIBVIRT_URI",
            help="Where a host runs its VMs ('none': no VMs)",
        ),
    ] = "qemu:///system",
    peers: Annotated[
        bool,
        typer.Option(
            "--peers/--no-peers",
            help="Trade chunks with other hosts (--no-peers: a host uses storage centers only)",
        ),
    ] = True,
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run a daemon until SIGTERM or SIGINT."""
    try:
        flavors = load_flavors(flavors_file)
    except ConfigError as exc:
        fail(str(exc))
    try:
        parsed_role = Role(role)
    except ValueError:
        fail(f"--role must be 'host' or 'storage', got {role!r}")
    try:
        upload_rate = parse_rate(upload_limit)
    except ValueError as exc:
        fail(f"--upload-limit: {exc}")
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        fail(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = NodeConfig(
        role=parsed_role,
        data_dir=data_dir,
        listen=_address(listen, "--listen"),
        tracker=None if tracker is None else _address(tracker, "--tracker"),
        control_path=control,
        rack=rack,
        max_peers=max_peers,
        upload_slots=upload_slots,
        upload_limit=upload_rate,
        libvirt_uri=None if libvirt_uri.lower() == "none" else libvirt_uri,
        flavors=flavors,
        download=DownloadConfig(no_source_timeout=no_source_timeout),
        peers=peers,
    )
    if config.tracker is None:
        logging.getLogger(__name__).warning("no --tracker given: running without a tracker")
    try:
        trio.run(run_until_signalled, config)
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # unwrap trio's exception groups to report one clear line
        error = _first_error(exc)
        if isinstance(error, NodeError | ControlError | StoreError | OSError):
            fail(str(error))
        raise


def _split_name(text: str) -> tuple[str, str | None]:
    name, sep, version = text.partition(":")
    if not name or (sep and not version):
        fail(f"template must be NAME or NAME:VERSION, got {text!r}")
    return name, version if sep else None


def _control_path(control: Path | None) -> Path:
    return control if control is not None else DEFAULT_CONTROL


class _ProgressView:
    """Draws fetch progress on stderr: a bar on a terminal, a line now and then otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self._last_plain = 0.0
        self._drawn = False

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event != "progress":
            return
        done = int(data.get("done_bytes", 0))
        total = int(data.get("total_bytes", 0))
        percent = 100.0 if total == 0 else 100.0 * done / total
        rate = float(data.get("rate", 0.0))
        eta = data.get("eta")
        eta_text = "--" if eta is None else f"{float(eta):.0f}s"
        text = (
            f"{percent:5.1f}%  {human_bytes(rate)}/s  ETA {eta_text}  "
            f"sources {data.get('sources', 0)}  "
            f"centers {human_bytes(int(data.get('bytes_from_centers', 0)))}  "
            f"peers {human_bytes(int(data.get('bytes_from_peers', 0)))}"
        )
        if self.tty:
            width = 24
            filled = int(width * percent / 100)
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(f"\r{self.label} [{bar}] {text}\x1b[K")
            sys.stderr.flush()
            self._drawn = True
            return
        now = time.monotonic()
        if now - self._last_plain >= PLAIN_PROGRESS_EVERY:
            self._last_plain = now
            sys.stderr.write(f"{self.label}: {text}\n")
            sys.stderr.flush()

    def finish(self) -> None:
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


def fetch(
    template: Annotated[str, typer.Argument(help="NAME or NAME:VERSION")],
    control: ControlOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Ask the local daemon to fetch a template and wait until it is verified."""
    name, version = _split_name(template)
    path = _control_path(control)
    view = _ProgressView(template)
    try:
        result = trio.run(call_control, path, "fetch", {"name": name, "version": version}, view)
    except ControlUnreachable as exc:
        view.finish()
        fail(str(exc))
    except RpcError as exc:
        view.finish()
        fail(exc.message)
    view.finish()
    summary = {
        key: result.get(key)
        for key in (
            "template_id",
            "path",
            "size",
            "seconds",
            "chunks_seconds",
            "bytes_from_centers",
            "bytes_from_peers",
            "sources",
        )
    }
    if json_output:
        print_json(summary)
        return
    typer.echo(
        f"fetched {result.get('name', name)}:{result.get('version', version)} "
        f"({summary['template_id']}) to {summary['path']}: "
        f"{human_bytes(int(summary['size'] or 0))} in {float(summary['seconds'] or 0):.2f}s, "
        f"{human_bytes(int(summary['bytes_from_centers'] or 0))} from centers, "
        f"{human_bytes(int(summary['bytes_from_peers'] or 0))} from peers, "
        f"{summary['sources']} sources"
    )


def status(
    control: ControlOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Show the local daemon's templates, rates, peers and bans."""
    path = _control_path(control)
    try:
        result = trio.run(call_control, path, "status", {})
    except ControlUnreachable as exc:
        fail(str(exc))
    except RpcError as exc:
        fail(exc.message)
    if json_output:
        print_json(result)
        return
    for line in _status_lines(result):
        typer.echo(line)


def _status_lines(status: dict[str, Any]) -> list[str]:
    tracker = status.get("tracker") or {}
    state = "connected" if tracker.get("connected") else f"away: {tracker.get('last_error')}"
    listen = status.get("listen")
    lines = [
        f"{status.get('role')} daemon {status.get('peer_id')} on "
        f"{'-' if not listen else f'{listen[0]}:{listen[1]}'}, "
        f"tracker {tracker.get('address')} ({state}), "
        f"{status.get('connections')}/{status.get('max_peers')} connections"
    ]
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
            address = p.get("listen") or p.get("address")
            where = "-" if not address else f"{address[0]}:{address[1]}"
            lines.append(
                f"    peer {p['peer_id'][:16]} {p['role']:<7} {where:<21} {p['direction']:<3} "
                f"{p['percent']:5.1f}%  in {human_bytes(p['bytes_in'])}  "
                f"out {human_bytes(p['bytes_out'])}"
            )
        for b in t.get("banned", []):
            address = b.get("address")
            where = "-" if not address else f"{address[0]}:{address[1]}"
            lines.append(
                f"    banned {b['peer_id'][:16]} {where}: {b['reason']} "
                f"({b['corrupt_chunks']} corrupt chunks)"
            )
    return lines


def register(app: typer.Typer) -> None:
    """Add `daemon run`, `fetch` and `status` to the vmswarm app."""
    app.add_typer(daemon_app, name="daemon")
    app.command("fetch")(fetch)
    app.command("status")(status)
