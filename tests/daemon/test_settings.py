"""The configuration: flags > VMSWARM_* variables > the TOML file > defaults, with provenance."""

from __future__ import annotations

import io
import logging
import tomllib
from pathlib import Path

import pytest
from vmswarm.cli.config_command import example_text
from vmswarm.daemon import settings as settings_module
from vmswarm.daemon.logfmt import LogfmtFormatter, quote, setup_logging
from vmswarm.daemon.settings import (
    ENV_CONFIG,
    KEYS,
    SettingsError,
    key,
    key_lines,
    load_settings,
)

CONFIG = """\
# a host
[cluster]
tracker = "10.0.0.1:7000"

[daemon]
role = "host"
max_peers = 12
upload_limit = "100Mbit"
peers = false

[log]
level = "debug"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vmswarm.toml"
    path.write_text(text)
    return path


def test_defaults_apply_without_the_default_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    settings = load_settings(env={ENV_CONFIG: ""})
    assert settings.path == tmp_path / "absent.toml" and not settings.loaded
    assert settings["daemon.max_peers"] == 64 and settings.where("daemon.max_peers") == "default"
    assert settings["cluster.tracker"] is None
    assert settings.control_socket() == Path("/var/lib/vmswarm/control.sock")
    # Every key has a valid default (or none): the schema checks itself.
    assert {name for name in settings.entries} == {k.dotted for k in KEYS}


def test_a_missing_named_file_is_an_error_but_a_missing_default_is_not(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(SettingsError, match=f"config file {missing} does not exist"):
        load_settings(missing, env={})
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(env={ENV_CONFIG: str(missing)})


def test_file_values_say_their_line(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG)
    settings = load_settings(path, env={})
    assert settings.loaded
    assert settings["cluster.tracker"] == ("10.0.0.1", 7000)
    assert settings.where("cluster.tracker") == f"{path}:3"
    assert settings["daemon.role"] == "host" and settings.where("daemon.role") == f"{path}:6"
    assert settings["daemon.max_peers"] == 12
    assert settings["daemon.upload_limit"] == pytest.approx(12.5e6)
    assert settings["daemon.peers"] is False
    assert settings["log.level"] == "debug" and settings.where("log.level") == f"{path}:12"
    assert settings.where("daemon.upload_slots") == "default"


def test_flags_beat_env_beat_file_beat_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG)
    env = {"VMSWARM_DAEMON_MAX_PEERS": "20", "VMSWARM_TRACKER": "10.0.0.2:7000"}
    settings = load_settings(
        path, env=env, flags={"daemon.max_peers": 30, "daemon.rack": None, "log.level": "error"}
    )
    assert settings["daemon.max_peers"] == 30
    assert settings.entries["daemon.max_peers"].source == "flag"
    assert settings.where("daemon.max_peers") == "flag --max-peers"
    assert settings["cluster.tracker"] == ("10.0.0.2", 7000)
    assert settings.where("cluster.tracker") == "env VMSWARM_TRACKER"
    assert settings["log.level"] == "error"
    assert settings["daemon.role"] == "host"  # the file, nothing overrides it
    assert settings["daemon.rack"] is None and settings.where("daemon.rack") == "default"
    # An empty variable counts as unset.
    assert load_settings(path, env={"VMSWARM_TRACKER": ""}).where("cluster.tracker").endswith(":3")


def test_the_older_variable_names_fit_the_scheme(tmp_path: Path) -> None:
    env = {
        "VMSWARM_CONTROL": str(tmp_path / "c.sock"),
        "VMSWARM_LIBVIRT_URI": "test:///default",
        "VMSWARM_TRACKER": "[::1]:7000",
    }
    settings = load_settings(write(tmp_path, ""), env=env)
    assert settings.control_socket() == tmp_path / "c.sock"
    assert settings["daemon.libvirt_uri"] == "test:///default"
    assert settings["cluster.tracker"] == ("::1", 7000)
    assert key("daemon.max_peers").env == "VMSWARM_DAEMON_MAX_PEERS"
    assert key("cluster.trusted_keys").env == "VMSWARM_TRUSTED_KEYS"


def test_an_unknown_key_names_the_file_the_key_and_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[daemon]\nrole = "host"\n\nmax_peer = 3\n')
    with pytest.raises(SettingsError) as caught:
        load_settings(path, env={})
    message = str(caught.value)
    assert message.startswith(f"{path}:4: unknown key daemon.max_peer")
    assert "did you mean max_peers?" in message


def test_an_unknown_section_or_top_level_key_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '\n[deamon]\nrole = "host"\n')
    with pytest.raises(SettingsError, match=rf"^{path}:2: unknown section 'deamon'.*daemon\?"):
        load_settings(path, env={})
    path = write(tmp_path, 'tracker = "a:1"\n')
    with pytest.raises(SettingsError, match=rf"^{path}:1: unknown key 'tracker'"):
        load_settings(path, env={})


def test_a_bad_value_names_the_file_the_key_and_the_line(tmp_path: Path) -> None:
    cases = [
        ("[daemon]\nmax_peers = 0\n", 2, "daemon.max_peers: must be at least 1"),
        ('[daemon]\n\nmax_peers = "many"\n', 3, "daemon.max_peers: must be a whole number"),
        ('[daemon]\nrole = "hostx"\n', 2, "daemon.role: must be one of host, storage"),
        ('[daemon]\nlisten = "nowhere"\n', 2, "daemon.listen: address 'nowhere' is not HOST"),
        ('[daemon]\nupload_limit = "20Mb"\n', 2, "daemon.upload_limit: ambiguous unit"),
        ("[daemon]\npeers = 1\n", 2, "daemon.peers: must be true or false"),
        ('[cluster]\ntracker = "h:0"\n', 2, "cluster.tracker: address 'h:0' needs a non-zero"),
        ('[log]\nlevel = "loud"\n', 2, "log.level: must be one of debug, info"),
        ("[tracker]\nannounce_ttl = -1\n", 2, "tracker.announce_ttl: must be at least 0.1"),
    ]
    for text, line, reason in cases:
        path = write(tmp_path, text)
        with pytest.raises(SettingsError) as caught:
            load_settings(path, env={})
        assert str(caught.value) == f"{path}:{line}: {reason}" or str(caught.value).startswith(
            f"{path}:{line}: {reason}"
        ), (text, str(caught.value))


def test_bad_variables_and_flags_say_which(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    with pytest.raises(SettingsError, match=r"^\$VMSWARM_DAEMON_MAX_PEERS \(daemon.max_peers\)"):
        load_settings(path, env={"VMSWARM_DAEMON_MAX_PEERS": "x"})
    with pytest.raises(SettingsError, match=r"^--upload-limit: ambiguous unit"):
        load_settings(path, env={}, flags={"daemon.upload_limit": "20Mb"})
    with pytest.raises(SettingsError, match=r"^--interval: must be at least 0.1"):
        load_settings(path, env={}, flags={"cli.watch_interval": 0.0})


def test_invalid_toml_is_one_error_with_its_position(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon\n")
    with pytest.raises(SettingsError, match=rf"^config file {path} is not valid TOML: .*line 1"):
        load_settings(path, env={})


def test_key_lines_follow_tables_dotted_keys_and_multiline_strings() -> None:
    text = (
        "[daemon]\n"
        'rack = """\n'
        "max_peers = 3\n"  # inside the string: not a key
        '"""\n'
        "max_peers = 4\n"
        "[tracker]\n"
        '"listen" = "a:1"\n'
        "log.level = 'info'\n"
        "[ log ]\n"
    )
    lines = key_lines(text)
    assert lines[("daemon", "rack")] == 2
    assert lines[("daemon", "max_peers")] == 5
    assert lines[("tracker", "listen")] == 7
    assert lines[("tracker", "log", "level")] == 8
    assert lines[("log",)] == 9


def test_lists_of_paths_come_from_the_file_a_variable_or_repeated_flags(tmp_path: Path) -> None:
    path = write(tmp_path, '[cluster]\ntrusted_keys = ["/k/a.pub", "/k/b.pub"]\n')
    assert load_settings(path, env={})["cluster.trusted_keys"] == (
        Path("/k/a.pub"),
        Path("/k/b.pub"),
    )
    env = {"VMSWARM_TRUSTED_KEYS": "/k/c.pub, /k/d.pub"}
    assert load_settings(path, env=env)["cluster.trusted_keys"] == (
        Path("/k/c.pub"),
        Path("/k/d.pub"),
    )
    flags = {"cluster.trusted_keys": [Path("/k/e.pub")]}
    assert load_settings(path, env=env, flags=flags)["cluster.trusted_keys"] == (Path("/k/e.pub"),)


def test_the_example_file_is_valid_and_means_the_defaults(tmp_path: Path) -> None:
    defaults = load_settings(write(tmp_path, ""), env={})
    text = example_text()
    tomllib.loads(text)
    settings = load_settings(write(tmp_path, text), env={})
    for name, setting in settings.entries.items():
        assert setting.value == defaults[name], name
        assert setting.source == ("default" if setting.key.default is None else "file"), name


def test_logfmt_lines_carry_the_context_fields() -> None:
    record = logging.LogRecord(
        "vmswarm.daemon.download", logging.WARNING, __file__, 1, "chunk %d failed", (17,), None
    )
    record.__dict__.update({"template": "debian:12", "peer": b"\x01\x02", "chunk": 17})
    record.created = 0.5
    line = LogfmtFormatter().format(record)
    assert line == (
        "ts=1970-01-01T00:00:00.500Z level=warning logger=vmswarm.daemon.download "
        'msg="chunk 17 failed" template=debian:12 peer=0102 chunk=17'
    )
    assert quote('say "hi"\nnow') == '"say \\"hi\\"\\nnow"'
    assert quote("") == '""' and quote(None) == "-" and quote(True) == "true"


def test_logfmt_setup_uses_the_level_and_keeps_one_line_per_record() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = setup_logging("info", stream)
    try:
        log = logging.getLogger("vmswarm.test.settings")
        log.debug("hidden")
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            log.exception("it broke", extra={"template": "t:1"})
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert 'msg="it broke" template=t:1 error="ValueError: bad\\nthing" traceback=' in lines[0]


def test_the_cli_finds_the_host_units_control_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    unit_socket = tmp_path / "run" / "control.sock"
    monkeypatch.setattr(settings_module, "SYSTEMD_HOST_CONTROL", unit_socket)
    config = write(tmp_path, f'[daemon]\ndata_dir = "{data}"\n')
    # Neither exists: the data directory's, so the error names where the daemon would be.
    assert load_settings(config, env={}).control_socket() == data / "control.sock"
    unit_socket.parent.mkdir()
    unit_socket.touch()
    assert load_settings(config, env={}).control_socket() == unit_socket
    # A socket in the data directory, or a configured one, always wins.
    (data / "control.sock").touch()
    assert load_settings(config, env={}).control_socket() == data / "control.sock"
    chosen = tmp_path / "chosen.sock"
    env = {"VMSWARM_CONTROL": str(chosen)}
    assert load_settings(config, env=env).control_socket() == chosen
