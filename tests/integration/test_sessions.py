"""The terminal client's view of PTY sessions: the `ext_command`/`ext_idle_s` keys of pty.list
and `ext_exit_status` of pty.exit (sent only to a client that asks), `attach` exiting with the
session's status, `sessions` across several daemons (one down) and `kill`."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from helpers import closed_port, daemon_command, wait_for
from listening import RELAY_ID
from terminal import Terminal

SPEC_KEYS = {"session_id", "attachments", "effective_cols", "effective_rows", "last_known_cols",
             "last_known_rows", "scrollback_bytes"}


def attach_params(sid: str, aid: str = "a", token: str = "t", **extra) -> dict:
    return {"session_id": sid, "attachment_id": aid, "client_attachment_token": token,
            "cols": 80, "rows": 24, **extra}


def write(stream, sid: str, data: bytes, aid: str = "a", token: str = "t") -> None:
    stream.send({"method": "pty.write", "params": dict(
        session_id=sid, attachment_id=aid, client_attachment_token=token,
        data_base64=base64.b64encode(data).decode())})


def listed(stream, params=None) -> list[dict]:
    response = stream.call("pty.list") if params is None else stream.call("pty.list", params)
    return response["result"]["sessions"]


# --- pty.list: ext_command, ext_idle_s --------------------------------------------------------


def test_pty_list_adds_ext_keys_only_for_a_client_that_asks(spawn_daemon):
    daemon = spawn_daemon("--shell", "/bin/sh")
    assert daemon.call("pty.attach", attach_params("cmd", command="exec cat"))["ok"]
    assert daemon.call("pty.attach", attach_params("shell", aid="b"))["ok"]
    plain = listed(daemon)
    assert [set(s) for s in plain] == [SPEC_KEYS, SPEC_KEYS]  # upstream's entries, exactly
    # Only `true` announces: other values are no announcement, and change nothing.
    assert listed(daemon, {"ext_command": 1, "ext_idle_s": "yes"}) == plain
    only_command = listed(daemon, {"ext_command": True})
    assert [(s["session_id"], s["ext_command"]) for s in only_command] == [
        ("cmd", "exec cat"), ("shell", "/bin/sh")]
    assert all("ext_idle_s" not in s for s in only_command)
    time.sleep(1.2)
    before = {s["session_id"]: s["ext_idle_s"] for s in
              listed(daemon, {"ext_command": True, "ext_idle_s": True})}
    assert before["cmd"] >= 1.0
    write(daemon, "cmd", b"x\n")
    wait_for(lambda: listed(daemon, {"ext_idle_s": True})[0]["ext_idle_s"] < before["cmd"],
             message="input to make the session active again")


def test_pty_list_ext_keys_cross_the_hub_link(spawn_listening):
    d = spawn_listening(workers=1)
    s = d.authed()
    assert s.call("pty.attach", attach_params("work", command="exec sleep 60"))["ok"]
    assert [set(e) for e in listed(s)] == [SPEC_KEYS]
    [entry] = listed(s, {"ext_command": True, "ext_idle_s": True})
    assert entry["ext_command"] == "exec sleep 60" and entry["ext_idle_s"] >= 0


# --- pty.exit: ext_exit_status -------------------------------------------------------------------


def exit_of(stream, sid, aid) -> dict:
    while True:
        ev = stream.next_event("pty.exit", timeout=20)
        if ev["session_id"] == sid and ev["attachment_id"] == aid:
            return ev


@pytest.mark.parametrize("command, status", [
    ("read x; exit 3", {"code": 3}),
    ("read x; exit 0", {"code": 0}),
    ("read x; kill -TERM $$", {"signal": 15}),
])
def test_pty_exit_carries_the_status_to_the_attachment_that_asked(spawn_listening, command,
                                                                  status):
    d = spawn_listening(workers=1)
    s = d.authed()
    assert s.call("pty.attach", attach_params("job", command=command, ext_exit_status=True))["ok"]
    assert s.call("pty.attach", attach_params("job", aid="upstream", token="u"))["ok"]
    write(s, "job", b"go\n")
    asked = exit_of(s, "job", "a")
    assert asked["ext_exit_status"] == status
    assert "ext_exit_status" not in exit_of(s, "job", "upstream")


def test_a_detach_or_close_reports_no_exit_status(daemon):
    assert daemon.call("pty.attach", attach_params("d", command="exec cat",
                                                   ext_exit_status=True))["ok"]
    assert daemon.call("pty.detach", dict(session_id="d", attachment_id="a",
                                          client_attachment_token="t"))["ok"]
    assert "ext_exit_status" not in exit_of(daemon, "d", "a")
    assert daemon.call("pty.attach", attach_params("d", ext_exit_status=True))["ok"]
    assert daemon.call("pty.close", {"session_id": "d"})["ok"]
    assert "ext_exit_status" not in exit_of(daemon, "d", "a")


# --- attach exits with the session's status ----------------------------------------------------


@pytest.mark.parametrize("command, code, said", [
    ("echo started; read x; exit 3", 3, b"[exited with 3: session s]"),
    ("echo started; read x; kill -KILL $$", 128 + 9, b"[killed by SIGKILL: session s]"),
])
def test_attach_exits_with_the_session_status(spawn_listening, command, code, said):
    d = spawn_listening(workers=1)
    term = Terminal(d.cli_command() + ["attach", f"cmux://127.0.0.1:{d.port}", "s",
                                       "--command", command], d.client_env())
    try:
        term.read_until(b"started")
        term.write(b"go\r")
        assert term.wait() == code
        assert said in term.out
    finally:
        term.close()


# --- sessions across hosts, and kill ---------------------------------------------------------


def write_fleet(path: Path, hosts: dict[str, tuple[str, Path]]) -> Path:
    doc = {"version": 1, "tailnet": "", "hosts": [
        {"name": name, "dns_name": "", "tailnet_ips": [], "uri": uri, "relay_id": RELAY_ID,
         "credentials": {"token_file": str(token)}, "tags": [], "os": "linux"}
        for name, (uri, token) in sorted(hosts.items())]}
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def fleet(spawn_listening, tmp_path):
    """honey and bee up, each with sessions; hive down. Returns (env, honey, bee)."""
    honey = spawn_listening(workers=1)
    bee = spawn_listening(workers=1)
    hosts = {"honey": (f"cmux://127.0.0.1:{honey.port}", honey.token_file),
             "bee": (f"cmux://127.0.0.1:{bee.port}", bee.token_file),
             "hive": (f"cmux://127.0.0.1:{closed_port()}", honey.token_file)}
    env = dict(os.environ, HOME=str(tmp_path),
               CMUX_FLEET=str(write_fleet(tmp_path / "cmux.json", hosts)))
    env.pop("CMUX_RELAY_ID", None)
    env.pop("CMUX_RELAY_TOKEN", None)
    s = honey.authed()
    assert s.call("pty.attach", attach_params("work", command="exec sleep 300"))["ok"]
    # A name chosen to drive the reader's terminal: it must be shown escaped.
    assert s.call("pty.attach", attach_params("x\x1b]0;owned\x07", aid="b",
                                              command="exec sleep 300"))["ok"]
    b = bee.authed()
    assert b.call("pty.attach", attach_params("build", cols=120, rows=40,
                                              command="exec sleep 300"))["ok"]
    b.close()
    yield env, honey, bee
    s.close()


def cli(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(daemon_command(*args), capture_output=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_sessions_lists_every_host_of_the_fleet_and_names_the_one_down(fleet):
    env, honey, bee = fleet
    result = cli("sessions", env=env)
    assert result.returncode == 3, result.stderr
    out = result.stdout.decode()
    assert "\x1b" not in out and "\x07" not in out
    lines = out.splitlines()
    table = [re.split(r"\s{2,}", line) for line in lines[:4]]
    assert table == [
        ["HOST", "SESSION", "COMMAND", "SIZE", "ATTACHED", "IDLE", "SCROLLBACK"],
        ["bee", "build", "exec sleep 300", "120x40", "0", table[1][5], "0B"],
        ["honey", "work", "exec sleep 300", "80x24", "1", table[2][5], "0B"],
        ["honey", "x\\x1b]0;owned\\x07", "exec sleep 300", "80x24", "1", table[3][5], "0B"],
    ]
    assert all(row[5].endswith("s") for row in table[1:])
    assert "honey  x\\x1b]0;owned\\x07" in out
    assert any(line.startswith("hive: down: connection refused") for line in lines)
    assert lines[-1] == "3 sessions on 2 hosts; 1 host not reached"


def test_sessions_json_names_hosts_and_keeps_the_daemon_entries(fleet):
    env, honey, bee = fleet
    result = cli("sessions", "--json", "bee", "hive", env=env)
    assert result.returncode == 3
    doc = json.loads(result.stdout)
    assert [(h["name"], h["state"]) for h in doc["hosts"]] == [("bee", "up"), ("hive", "down")]
    [build] = doc["hosts"][0]["sessions"]
    assert build["session_id"] == "build" and build["ext_command"] == "exec sleep 300"
    assert build["effective_cols"] == 120 and build["ext_idle_s"] >= 0
    assert "connection refused" in doc["hosts"][1]["error"]
    assert (doc["sessions"], doc["not_reached"]) == (1, 1)
    # Every host answering: exit 0; an address works as well as a name.
    result = cli("sessions", "--json", f"cmux://127.0.0.1:{bee.port}", "honey",
                 env=dict(env, CMUX_RELAY_ID=RELAY_ID, CMUX_RELAY_TOKEN=bee.token))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sessions"] == 3


def test_sessions_without_hosts_or_fleet_says_what_to_do(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), CMUX_FLEET=str(tmp_path / "none.json"))
    result = cli("sessions", env=env)
    assert result.returncode == 2
    assert b"name the hosts to ask" in result.stderr
    result = cli("sessions", "cmux://127.0.0.1:99999", env=env)
    assert result.returncode == 2 and b"port must be between" in result.stderr


def session_ids(daemon) -> list[str]:
    s = daemon.authed()
    try:
        return [e["session_id"] for e in listed(s)]
    finally:
        s.close()


def test_kill_refuses_without_a_terminal_then_ends_with_yes(fleet):
    env, honey, _ = fleet
    result = cli("kill", "honey", "work", env=env)
    assert result.returncode == 2
    assert b"pass --yes" in result.stderr
    assert "work" in session_ids(honey)
    result = cli("kill", "honey", "work", "--yes", env=env)
    assert result.returncode == 0, result.stderr
    assert b"ended session 'work'" in result.stderr
    assert "work" not in session_ids(honey)
    assert len(session_ids(honey)) == 1  # the other session lives on
    result = cli("kill", "honey", "work", "--yes", env=env)
    assert result.returncode == 1
    assert b"there is no session 'work'" in result.stderr and b"sessions honey" in result.stderr


def test_kill_asks_on_a_terminal(fleet):
    env, honey, _ = fleet
    argv = daemon_command("kill", "honey", "work")
    no = Terminal(argv, env)
    try:
        no.read_until(b"end session work on honey (running exec sleep 300, 1 attached)? [y/N]")
        no.write(b"n\r")
        assert no.wait() == 1
    finally:
        no.close()
    assert "work" in session_ids(honey)
    yes = Terminal(argv, env)
    try:
        yes.read_until(b"[y/N]")
        yes.write(b"y\r")
        assert yes.wait() == 0
    finally:
        yes.close()
    assert "work" not in session_ids(honey)
