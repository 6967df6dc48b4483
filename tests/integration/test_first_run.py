"""The first five minutes: the scripts, the command line's usage, help and messages, as a new
user meets them in a fresh clone."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cmuxd import __version__
from cmuxd.cli import build_parser
from cmuxd.status import query_status
from helpers import TcpServer, stop_process, wait_for, write_token_file
from listening import ListeningDaemon, free_port

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict | None = None, stdin=subprocess.DEVNULL,
            timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cmuxd", *args], capture_output=True,
                          text=True, env=env, stdin=stdin, timeout=timeout)


def clean_env(home: Path, **extra: str) -> dict:
    """A new user's environment: their own home, no relay variables, no fleet file."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CMUX_RELAY_ID", "CMUX_RELAY_TOKEN", "CMUX_FLEET", "XDG_CONFIG_HOME")}
    env.update(HOME=str(home), **extra)
    return env


@pytest.fixture(scope="module")
def daemon():
    d = ListeningDaemon()
    d.wait_ready()
    yield d
    d.close()


# scripts


def test_scripts_run_prints_a_ping_command_that_reaches_the_daemon(tmp_path):
    port = free_port()
    env = clean_env(tmp_path)
    env.pop("XDG_RUNTIME_DIR", None)
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [str(REPO / "scripts" / "run"), "--tcp", f"127.0.0.1:{port}", "--workers", "1",
         "--state-dir", str(state), "--socket", str(tmp_path / "cmuxd.sock")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        line = ""
        while "ping it with:" not in line:
            line = proc.stderr.readline().decode()
            assert line, "scripts/run ended without printing a ping command"
        command = shlex.split(line.split("ping it with:", 1)[1])
        assert command[1:] == ["ping", f"cmux://127.0.0.1:{port}"]
        wait_for(lambda: _answers(state), timeout=30, message="the daemon to start")
        out = subprocess.run([*command, "-c", "1"], capture_output=True, text=True, env=env,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        assert "pong from" in out.stdout
    finally:
        stop_process(proc)
        proc.stderr.close()


def _answers(state_dir: Path) -> bool:
    try:
        return all(w["alive"] for w in query_status(state_dir / "control.sock")["workers"])
    except OSError:
        return False


def test_setup_installs_the_systemd_extra_once_libsystemd_appears(tmp_path):
    """The stamp that makes a second ./scripts/setup quick must include the extras: an
    existing clone gains systemd-python after libsystemd-dev is installed. The venv's python
    here is a recording stand-in for pip; pkg-config says whether libsystemd is there."""
    root = tmp_path / "clone"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup", root / "scripts" / "setup")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    venv_bin = root / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    calls = tmp_path / "pip-calls"
    stand_in(venv_bin / "python", f'echo "$*" >> {calls}')
    tools = tmp_path / "tools"
    tools.mkdir()
    env = dict(os.environ, PATH=f"{tools}:{os.environ['PATH']}")

    def setup(libsystemd: bool) -> list[str]:
        stand_in(tools / "pkg-config", "exit 0" if libsystemd else "exit 1")
        calls.write_text("")
        out = subprocess.run([str(root / "scripts" / "setup")], capture_output=True,
                             text=True, env=env, timeout=30)
        assert out.returncode == 0, out.stderr
        return [c for c in calls.read_text().splitlines() if " -e " in c]

    assert [c.endswith(f"{root}[test]") for c in setup(False)] == [True]
    assert setup(False) == []  # nothing changed: quick
    installs = setup(True)
    assert [c.endswith(f"{root}[test,systemd]") for c in installs] == [True]
    assert setup(True) == []


def stand_in(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def test_pyproject_license_is_an_spdx_string():
    """A license table makes setuptools warn at every install; 77 is the first release that
    takes the SPDX string."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert "setuptools>=77" in project["build-system"]["requires"]


def test_the_socket_without_xdg_runtime_dir_is_documented(tmp_path):
    env = clean_env(tmp_path)
    env.pop("XDG_RUNTIME_DIR", None)
    code = ("from cmuxd.supervisor.listeners import default_socket_path; "
            "print(default_socket_path())")
    actual = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=30).stdout.strip()
    shown = actual.replace(str(tmp_path), "~")
    assert shown == "~/.local/state/cmux/cmuxd.sock"
    help_text = " ".join(run_cli("serve", "--help", env=env).stdout.split())
    assert shown in help_text
    assert "$XDG_RUNTIME_DIR/cmuxd/cmuxd.sock" in help_text
    assert shown.rsplit("/", 1)[0] in (REPO / "README.md").read_text().split("## Using it")[0]


# usage


@pytest.mark.parametrize("args", [[], ["token"], ["units"], ["fleet"]],
                         ids=["bare", "token", "units", "fleet"])
def test_a_missing_command_is_a_usage_error(args):
    out = run_cli(*args)
    assert out.returncode == 2, out
    assert out.stderr.startswith("usage: cmuxd-remote")
    assert "required: COMMAND" in out.stderr


def test_version_option_and_command():
    for args in (["--version"], ["version"]):
        out = run_cli(*args)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == __version__


@pytest.mark.parametrize("spec, message", [
    ("5555", "expected HOST:PORT"),
    ("127.0.0.1:http", "the port must be a number"),
    ("[::1]:70000", "between 0 and 65535"),
])
def test_serve_rejects_a_malformed_tcp_address_as_usage(tmp_path, spec, message):
    state = tmp_path / "state"
    out = run_cli("serve", "--tcp", spec, "--state-dir", str(state), env=clean_env(tmp_path))
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("cmuxd-remote: --tcp") and message in out.stderr
    assert "Traceback" not in out.stderr
    assert not state.exists()  # nothing started


# help


def all_parsers():
    """(command line, parser) for the top level and every command and group."""
    found = []

    def walk(prefix, parser):
        found.append((prefix, parser))
        for action in parser._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    walk(f"{prefix} {name}", sub)
    walk("cmuxd-remote", build_parser())
    return found


def test_every_option_has_help_and_shows_its_default_once():
    for command, parser in all_parsers():
        for action in parser._actions:
            if not action.option_strings or action.help == "==SUPPRESS==":
                continue
            text = " ".join(parser.formatter_class(command)._expand_help(action).split())
            where = f"{command} {action.option_strings[-1]}"
            assert re.search(r"[a-z]{3}", text), f"{where} has no help: {text!r}"
            assert text.count("(default") <= 1, f"{where}: {text}"
            assert not re.fullmatch(r"-|True|False|[\d.]+|'.*'", text), f"{where}: {text}"


def test_a_one_letter_option_means_the_same_in_every_command():
    meaning: dict[str, set[str]] = {}
    for _, parser in all_parsers():
        for action in parser._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            for short in (o for o in action.option_strings if len(o) == 2 and o != "-h"):
                meaning.setdefault(short, set()).update(longs)
    assert all(len(longs) == 1 for longs in meaning.values()), meaning


def test_top_level_and_group_help_are_written_for_users():
    out = run_cli("--help")
    assert out.returncode == 0
    assert "argh" not in out.stdout and "Command line: parse" not in out.stdout
    assert "Exit codes" in out.stdout
    for group in ("token", "units", "fleet"):
        listed = re.search(rf"^\s+{group}\s+(\S.*)$", out.stdout, re.M)
        assert listed, f"{group} has no description in --help"
        own = run_cli(group, "--help")
        assert own.returncode == 0 and listed.group(1) in own.stdout


# messages


def test_a_wrong_token_names_the_host_name_as_the_relay_id_source(daemon, tmp_path):
    home = tmp_path / "home"
    (home / ".config" / "cmuxd").mkdir(parents=True)
    write_token_file(home / ".config" / "cmuxd" / "relay-token")
    out = run_cli("ping", f"127.0.0.1:{daemon.port}", "-c", "1", env=clean_env(home))
    assert out.returncode == 4, out.stderr
    assert "relay id from the host name" in out.stderr
    assert "--relay-id" not in out.stderr.split("(credentials:", 1)[1]
    assert daemon.token not in out.stderr
    assert daemon.authed().call("ping", id=1)["ok"] is True


def test_a_bare_name_missing_from_cmux_json_says_so(tmp_path):
    (tmp_path / ".config" / "cmuxd").mkdir(parents=True)
    write_token_file(tmp_path / ".config" / "cmuxd" / "relay-token")
    out = run_cli("ping", "honey", "-c", "1", env=clean_env(tmp_path))
    assert out.returncode == 4, out.stderr
    assert out.stderr.startswith("cmuxd-remote: honey is not a host in "
                                 f"{tmp_path}/.config/cmuxd/cmux.json")
    assert "fleet config" in out.stderr and "--relay-id" in out.stderr


def test_a_second_daemon_on_the_state_dir_names_the_control_socket(daemon):
    out = run_cli("serve", "--tcp", f"127.0.0.1:{free_port()}", "--token-file",
                  str(daemon.token_file), "--state-dir", str(daemon.state_dir),
                  env=daemon.env)
    assert out.returncode == 1
    assert "the control socket" in out.stderr and "--state-dir" in out.stderr
    assert "--socket" not in out.stderr
    assert daemon.unix().call("ping", id=1)["ok"] is True


def test_rpc_timeout_bounds_the_handshake_too(daemon):
    """A server that accepts and never says a word: --timeout, not the 5 s handshake limit,
    ends the call."""
    with TcpServer(lambda conn: conn.recv(65536) and conn.recv(65536)) as silent:
        out = run_cli("rpc", "--timeout", "1", f"127.0.0.1:{silent.port}", "ping",
                      env=daemon.client_env())
    assert out.returncode == 5, out.stderr
    assert "ping did not complete within --timeout 1 s" in out.stderr
    assert "handshake did not finish" not in out.stderr
    assert daemon.token not in out.stderr


def test_rpc_timeout_still_allows_a_normal_call(daemon):
    out = run_cli("rpc", "--timeout", "20", f"127.0.0.1:{daemon.port}", "ping",
                  env=daemon.client_env())
    assert out.returncode == 0, out.stderr
    assert '"pong": true' in out.stdout


def test_attach_without_a_terminal_is_refused_and_starts_nothing(daemon):
    out = run_cli("attach", f"127.0.0.1:{daemon.port}", "work", env=daemon.client_env())
    assert out.returncode == 2, out.stderr
    assert "attach needs a terminal on stdin" in out.stderr
    assert daemon.status()["pty_sessions"] == 0
    assert daemon.authed().call("ping", id=1)["ok"] is True


def test_each_option_goes_by_the_names_it_was_given():
    units = dict(all_parsers())["cmuxd-remote units install"]
    names = {o for action in units._actions for o in action.option_strings}
    assert {"--as", "--print"} <= names
    assert not {"--as-user", "--print-only"} & names
