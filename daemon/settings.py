"""vmswarm's configuration: a TOML file, VMSWARM_* variables and flags, each value with its origin.

Precedence: flags > environment variables > the file > defaults. Every setting is one key,
`section.name` (`daemon.max_peers`), with one variable (`VMSWARM_DAEMON_MAX_PEERS`; a few keep
their older short names, like `VMSWARM_TRACKER`) and, on the commands that take it, one flag.
The file is `/etc/vmswarm/vmswarm.toml` unless `--config` or `$VMSWARM_CONFIG` names another;
a missing default file means "no file", a missing named file is an error. An unknown key or a
bad value is a SettingsError that names the file, the key and its line.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..swarm.address import format_address, parse_address
from .ratelimit import parse_rate
from .tracker import DEFAULT_ANNOUNCE_TTL

DEFAULT_CONFIG_PATH = Path("/etc/vmswarm/vmswarm.toml")
ENV_CONFIG = "VMSWARM_CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
CONTROL_SOCKET_NAME = "control.sock"
# Where systemd/vmswarm-host.service puts the host daemon's control socket.
SYSTEMD_HOST_CONTROL = Path("/run/vmswarm/control.sock")

Parser = Callable[[object], Any]


class SettingsError(ValueError):
    """The configuration is wrong; the message names where (file:line, variable or flag) and why."""


# -- value parsers: each takes what TOML, the environment (str) or a flag gives and checks it ----


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _integer(minimum: int) -> Parser:
    def parse(value: object) -> int:
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number, got {value!r}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _number(minimum: float) -> Parser:
    def parse(value: object) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number, got {value!r}")
        if not value >= minimum:  # also refuses NaN
            raise ValueError(f"must be at least {minimum:g}, got {value:g}")
        return float(value)

    return parse


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _boolean(value: object) -> bool:
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _choice(*options: str) -> Parser:
    def parse(value: object) -> str:
        if isinstance(value, str) and value.strip().lower() in options:
            return value.strip().lower()
        raise ValueError(f"must be one of {', '.join(options)}, got {value!r}")

    return parse


def _address(*, nonzero_port: bool) -> Parser:
    def parse(value: object) -> tuple[str, int]:
        host, port = parse_address(_text(value))
        if nonzero_port and port == 0:
            raise ValueError(f"address {value!r} needs a non-zero port")
        return host, port

    return parse


def _path(value: object) -> Path:
    return value if isinstance(value, Path) else Path(_text(value))


def _rate(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    return parse_rate(_text(value))


def _paths(value: object) -> tuple[Path, ...]:
    """A list of paths; from a variable or a single flag, comma-separated."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        raise ValueError(f"must be a list of paths, got {value!r}")
    return tuple(_path(item) for item in value)


# -- the keys -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One setting: its section and name, how its value is checked, its default and its help."""

    section: str
    name: str
    parse: Parser
    default: object  # given like a file value and parsed the same way; None means unset
    help: str
    env_name: str | None = None  # None: VMSWARM_<SECTION>_<NAME> ([cluster]: VMSWARM_<NAME>)
    flag: str | None = None  # None: --<name with dashes>

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def env(self) -> str:
        if self.env_name:
            return self.env_name
        # [cluster] keys are shared by every role, so their variables skip the section.
        scope = "" if self.section == "cluster" else f"{self.section}_"
        return f"VMSWARM_{scope}{self.name}".upper()

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


KEYS: tuple[Key, ...] = (
    Key(
        "cluster",
        "tracker",
        _address(nonzero_port=True),
        None,
        "Tracker HOST:PORT: daemons announce to it, the CLI asks it.",
    ),
    Key(
        "cluster",
        "flavors",
        _path,
        None,
        "Flavors TOML file (a flavors.NAME table per flavor); unset: built-in tiny/small/medium.",
    ),
    Key(
        "cluster",
        "trusted_keys",
        _paths,
        [],
        "Public keys (.pub files) whose template signatures the tracker and daemons accept.",
        flag="--trusted-key",
    ),
    Key(
        "cluster",
        "allow_unsigned",
        _boolean,
        False,
        "Also accept templates without a signature (labs only).",
    ),
    Key("daemon", "role", _choice("host", "storage"), None, "host or storage."),
    Key("daemon", "data_dir", _path, "/var/lib/vmswarm", "Where stores, ids and VMs live."),
    Key(
        "daemon",
        "listen",
        _address(nonzero_port=False),
        "0.0.0.0:7881",
        "TCP HOST:PORT for peers and RPC.",
    ),
    Key(
        "daemon",
        "control",
        _path,
        None,
        f"The daemon's control socket, for the CLI; unset: DATA_DIR/{CONTROL_SOCKET_NAME}.",
        env_name="VMSWARM_CONTROL",
    ),
    Key("daemon", "rack", _text, None, "Rack label, for locality in the peer handout."),
    Key("daemon", "max_peers", _integer(1), 64, "Connection cap."),
    Key("daemon", "upload_slots", _integer(1), 8, "Chunks uploaded at once."),
    Key(
        "daemon",
        "upload_limit",
        _rate,
        "0",
        "Upload rate cap shared by all peers, e.g. 20MB, 100Mbit (0: unlimited).",
    ),
    Key(
        "daemon",
        "max_connections_per_address",
        _integer(1),
        32,
        "TCP connections to and from one IP address at once (max_peers caps the total).",
    ),
    Key("daemon", "peer_upload_limit", _rate, "0", "Upload rate cap per peer (0: unlimited)."),
    Key("daemon", "peer_download_limit", _rate, "0", "Download rate cap per peer (0: unlimited)."),
    Key(
        "daemon",
        "ban_seconds",
        _number(0.1),
        600.0,
        "Seconds a peer that sent garbage, oversized frames or floods stays banned.",
    ),
    Key(
        "daemon",
        "handshake_timeout",
        _number(0.1),
        10.0,
        "Seconds a new connection has to complete its handshake.",
    ),
    Key(
        "daemon",
        "idle_timeout",
        _number(0.1),
        120.0,
        "Seconds a peer link may stay silent (no message, no keepalive) before it is closed.",
    ),
    Key(
        "daemon",
        "no_source_timeout",
        _number(0.1),
        30.0,
        "Seconds a wanted chunk may have no source before a fetch fails.",
    ),
    Key(
        "daemon",
        "nbd_read_timeout",
        _number(1.0),
        60.0,
        "Seconds a streamed VM's read may wait for a chunk before it gets an I/O error.",
    ),
    Key(
        "daemon",
        "scrub_interval",
        _number(0.0),
        86400.0,
        "Seconds between a storage center's re-hashes of every chunk (0: only `vmswarm scrub`).",
    ),
    Key(
        "daemon",
        "libvirt_uri",
        _text,
        "qemu:///system",
        "Where a host runs its VMs ('none': no VMs).",
        env_name="VMSWARM_LIBVIRT_URI",
    ),
    Key(
        "daemon",
        "peers",
        _boolean,
        True,
        "Trade chunks with other hosts (false: a host uses storage centers only).",
    ),
    Key(
        "daemon",
        "metrics",
        _address(nonzero_port=False),
        None,
        "Serve Prometheus metrics at http://HOST:PORT/metrics (unset: off).",
    ),
    Key(
        "tracker",
        "listen",
        _address(nonzero_port=False),
        "0.0.0.0:7880",
        "TCP HOST:PORT to listen on.",
    ),
    Key(
        "tracker",
        "state_dir",
        _path,
        "/var/lib/vmswarm/tracker",
        "Directory of the SQLite template catalog.",
    ),
    Key(
        "tracker",
        "announce_ttl",
        _number(0.1),
        DEFAULT_ANNOUNCE_TTL,
        "Seconds a peer stays listed unless it re-announces.",
    ),
    Key(
        "tracker",
        "metrics",
        _address(nonzero_port=False),
        None,
        "Serve Prometheus metrics at http://HOST:PORT/metrics (unset: off).",
    ),
    Key(
        "tls",
        "ca",
        _path,
        None,
        "Cluster CA certificate (PEM) that every peer's certificate must chain to.",
        flag="--tls-ca",
    ),
    Key(
        "tls",
        "cert",
        _path,
        None,
        "This node's certificate (PEM, with its role).",
        flag="--tls-cert",
    ),
    Key("tls", "key", _path, None, "This node's private key (PEM, mode 0600).", flag="--tls-key"),
    Key(
        "tls",
        "insecure",
        _boolean,
        False,
        "Run without mutual TLS when no tls.ca/cert/key is set (labs and demos only; warns).",
        flag="--insecure",
    ),
    Key("log", "level", _choice(*LOG_LEVELS), "info", "Log threshold of the daemon and tracker."),
    Key(
        "cli",
        "log_level",
        _choice(*LOG_LEVELS),
        "warning",
        "Log threshold of client commands such as publish.",
        flag="--log-level",
    ),
    Key(
        "cli",
        "watch_interval",
        _number(0.1),
        2.0,
        "Seconds between refreshes of `vmswarm status --watch`.",
        flag="--interval",
    ),
)
KEYS_BY_NAME: Mapping[str, Key] = {key.dotted: key for key in KEYS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(key.section for key in KEYS))


def key(dotted: str) -> Key:
    """The Key for `section.name`; KeyError names the unknown key."""
    try:
        return KEYS_BY_NAME[dotted]
    except KeyError:
        raise KeyError(f"no setting {dotted!r}") from None


# -- where each value came from -----------------------------------------------------------------

DEFAULT = "default"
FILE = "file"
ENV = "env"
FLAG = "flag"


@dataclass(frozen=True)
class Setting:
    """One effective value and its origin: `source` is default/file/env/flag, `where` says more."""

    key: Key
    value: Any  # parsed; None when unset
    source: str
    where: str  # "default", "/etc/vmswarm/vmswarm.toml:12", "env VMSWARM_TRACKER", "flag --tracker"


def shown(value: object) -> object:
    """A setting's value as JSON and as `config show` prints it."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return format_address(str(value[0]), value[1])
    if isinstance(value, tuple):
        return [shown(item) for item in value]
    return value


@dataclass(frozen=True)
class Settings:
    """The effective configuration: every key's value and origin."""

    path: Path  # the config file looked for
    loaded: bool  # False: the default file does not exist, so no file was read
    entries: Mapping[str, Setting]

    def __getitem__(self, dotted: str) -> Any:
        return self.entries[key(dotted).dotted].value

    def where(self, dotted: str) -> str:
        return self.entries[key(dotted).dotted].where

    def control_socket(self) -> Path:
        """The daemon's control socket: daemon.control, else DATA_DIR/control.sock, unless only
        the systemd host unit's socket exists (the unit passes its path as a flag)."""
        control: Path | None = self["daemon.control"]
        if control is not None:
            return control
        data_dir: Path = self["daemon.data_dir"]
        beside_data = data_dir / CONTROL_SOCKET_NAME
        if not beside_data.exists() and SYSTEMD_HOST_CONTROL.exists():
            return SYSTEMD_HOST_CONTROL
        return beside_data

    def as_json(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            "file_loaded": self.loaded,
            "settings": {
                name: {"value": shown(s.value), "source": s.source, "where": s.where}
                for name, s in self.entries.items()
            },
        }


# -- finding a key's line (tomllib does not say) ------------------------------------------------

_BARE = r"[A-Za-z0-9_-]+"
_QUOTED = r"\"(?:[^\"\\]|\\.)*\"|'[^']*'"
_PART = rf"(?:{_BARE}|{_QUOTED})"
_DOTTED = rf"{_PART}(?:\s*\.\s*{_PART})*"
_TABLE_LINE = re.compile(rf"^\s*\[\s*({_DOTTED})\s*\]")
_ARRAY_TABLE_LINE = re.compile(rf"^\s*\[\[\s*({_DOTTED})\s*\]\]")
_KEY_LINE = re.compile(rf"^\s*({_DOTTED})\s*=")
_PARTS = re.compile(_PART)


def _split_dotted(text: str) -> tuple[str, ...]:
    parts = []
    for match in _PARTS.finditer(text):
        part = match.group(0)
        if part[0] in "\"'":
            part = part[1:-1]
        parts.append(part)
    return tuple(parts)


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The 1-based line of every table header and key in a TOML document, by its full path."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_multiline: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_multiline is not None:
            if line.count(in_multiline) % 2 == 1:
                in_multiline = None
            continue
        header = _ARRAY_TABLE_LINE.match(line) or _TABLE_LINE.match(line)
        if header is not None:
            table = _split_dotted(header.group(1))
            lines.setdefault(table, number)
            continue
        assignment = _KEY_LINE.match(line)
        if assignment is None:
            continue
        path = table + _split_dotted(assignment.group(1))
        for depth in range(len(table) + 1, len(path) + 1):
            lines.setdefault(path[:depth], number)
        rest = line[assignment.end() :]
        for quote in ('"""', "'''"):
            if rest.count(quote) % 2 == 1:
                in_multiline = quote
    return lines


# -- loading ------------------------------------------------------------------------------------


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _read_file(path: Path, explicit: bool) -> tuple[dict[str, Any], str] | None:
    """The parsed document and its text, or None when the default file does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise SettingsError(f"config file {path} does not exist") from None
        return None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise SettingsError(f"cannot read config file {path}: {reason}") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None


def _file_values(path: Path, data: Mapping[str, Any], text: str) -> dict[str, Setting]:
    lines = key_lines(text)

    def at(*parts: str) -> str:
        line = lines.get(parts)
        return f"{path}:{line}" if line is not None else str(path)

    found: dict[str, Setting] = {}
    for section, table in data.items():
        if section not in SECTIONS or not isinstance(table, dict):
            what = "section" if isinstance(table, dict) else "key"
            raise SettingsError(
                f"{at(section)}: unknown {what} {section!r}; the sections are "
                f"{', '.join(SECTIONS)}{_suggest(section, SECTIONS)}"
            )
        for name, raw in table.items():
            dotted = f"{section}.{name}"
            spec = KEYS_BY_NAME.get(dotted)
            if spec is None:
                known = [k.name for k in KEYS if k.section == section]
                raise SettingsError(
                    f"{at(section, name)}: unknown key {dotted}; [{section}] has "
                    f"{', '.join(known)}{_suggest(name, known)}"
                )
            where = at(section, name)
            try:
                value = spec.parse(raw)
            except ValueError as exc:
                raise SettingsError(f"{where}: {dotted}: {exc}") from None
            found[dotted] = Setting(spec, value, FILE, where)
    return found


def config_path(explicit: Path | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    """The config file to read and whether it was named (so must exist)."""
    if explicit is not None:
        return Path(explicit), True
    named = env.get(ENV_CONFIG, "").strip()
    if named:
        return Path(named), True
    return DEFAULT_CONFIG_PATH, False


def load_settings(
    config: Path | None = None,
    *,
    env: Mapping[str, str],
    flags: Mapping[str, object] | None = None,
) -> Settings:
    """The effective settings: `flags` (dotted key -> value; None means not given) over `env`
    over the config file over the defaults. SettingsError says what is wrong and where."""
    path, explicit = config_path(config, env)
    document = _read_file(path, explicit)
    from_file = {} if document is None else _file_values(path, *document)
    entries: dict[str, Setting] = {}
    for spec in KEYS:
        setting = from_file.get(spec.dotted)
        if setting is None:
            default = None if spec.default is None else spec.parse(spec.default)
            setting = Setting(spec, default, DEFAULT, DEFAULT)
        variable = env.get(spec.env, "")
        if variable.strip():
            try:
                setting = Setting(spec, spec.parse(variable), ENV, f"env {spec.env}")
            except ValueError as exc:
                raise SettingsError(f"${spec.env} ({spec.dotted}): {exc}") from None
        entries[spec.dotted] = setting
    for dotted, value in (flags or {}).items():
        spec = key(dotted)
        if value is None:
            continue
        try:
            entries[dotted] = Setting(spec, spec.parse(value), FLAG, f"flag {spec.option}")
        except ValueError as exc:
            raise SettingsError(f"{spec.option}: {exc}") from None
    return Settings(path, document is not None, entries)


__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_CONFIG",
    "KEYS",
    "LOG_LEVELS",
    "Key",
    "Setting",
    "Settings",
    "SettingsError",
    "config_path",
    "key",
    "key_lines",
    "load_settings",
    "shown",
]
