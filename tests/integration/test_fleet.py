"""The fleet on loopback: --allow-from at the gate, ext.status, host names from cmux.json in the
client, and `fleet status` over several real daemons (the multi-host version with network
namespaces is test_fleet_netns.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path


from helpers import daemon_command, wait_for
from listening import RELAY_ID, free_port, refused


def write_fleet(path: Path, hosts: dict[str, tuple[str, Path | None]]) -> Path:
    """A cmux.json naming each host's URI and token file, as `fleet config` writes it."""
    doc = {"version": 1, "tailnet": "", "hosts": [
        {"name": name, "dns_name": "", "tailnet_ips": [], "uri": uri, "relay_id": RELAY_ID,
         "credentials": {"token_file": str(token) if token else None}, "tags": [], "os": "linux"}
        for name, (uri, token) in sorted(hosts.items())]}
    path.write_text(json.dumps(doc, indent=2))
    return path


def client_env(home: Path, fleet: Path | None = None) -> dict:
    env = dict(os.environ, HOME=str(home))
    env.pop("CMUX_RELAY_ID", None)
    env.pop("CMUX_RELAY_TOKEN", None)
    env.pop("CMUX_FLEET", None)
    if fleet is not None:
        env["CMUX_FLEET"] = str(fleet)
    return env


def run(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(daemon_command(*args), capture_output=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_allow_from_closes_outsiders_before_the_challenge(spawn_listening):
    d = spawn_listening("--allow-from", "tailnet")
    sock = d.tcp_connect()
    # No challenge, no failure reply: the connection is closed unread.
    assert refused(sock) == b""
    wait_for(lambda: d.status()["counters"].get("refused_not_allowed") == 1,
             message="the refusal to be counted")
    counters = d.status()["counters"]
    assert counters["refused"] == 1 and "refused_backoff" not in counters
    # Unix clients are judged by their uid, not by --allow-from.
    unix = d.unix()
    assert unix.call("ping", id=1)["result"] == {"pong": True}
    unix.close()
    assert "TCP peers outside tailnet are closed before the handshake" in d.log()
    result = d.cli("ping", f"127.0.0.1:{d.port}", "-c", "1")
    assert result.returncode == 4
    assert b"closed the connection without a challenge" in result.stderr


def test_allow_from_loopback_serves_local_clients(spawn_listening):
    d = spawn_listening("--allow-from", "tailnet", "--allow-from", "127.0.0.0/8", v6=True)
    stream = d.authed("127.0.0.1")
    assert stream.call("ping", id=1)["result"] == {"pong": True}
    stream.close()
    assert refused(d.tcp_connect("::1")) == b""  # ::1 is not in the list


def test_a_bad_allow_from_stops_the_start_with_a_sentence():
    result = subprocess.run(daemon_command("serve", "--tcp", "127.0.0.1:0", "--allow-from",
                                           "tailnet,10.0.0.0/33"),
                            capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert b"--allow-from '10.0.0.0/33' is not" in result.stderr


def test_ext_status_tells_a_remote_client_uptime_workers_connections(spawn_listening):
    d = spawn_listening(workers=2)
    first = d.authed()
    hello = first.call("hello", id=1)["result"]
    assert "ext.status" in hello["capabilities"]
    figures = first.call("ext.status", id=2)["result"]
    assert set(figures) == {"uptime", "workers", "connections", "caller"}
    assert figures["caller"] == "shared token"
    assert figures["workers"] == 2 and figures["uptime"] >= 0
    assert figures["connections"] >= 1  # the asking connection counts itself
    others = [d.authed() for _ in range(3)]
    # The other workers' share arrives with the next heartbeat.
    wait_for(lambda: first.call("ext.status", id=3)["result"]["connections"] == 4,
             message="ext.status to count four connections")
    for stream in others:
        stream.close()
    first.close()


def test_client_commands_take_host_names_from_cmux_json(spawn_listening, tmp_path):
    d = spawn_listening()
    fleet = write_fleet(tmp_path / "cmux.json",
                        {"honey": (f"cmux://127.0.0.1:{d.port}", d.token_file)})
    env = client_env(tmp_path, fleet)
    ping = run("ping", "honey", "-c", "2", "-i", "0", env=env)
    assert ping.returncode == 0, ping.stderr
    assert ping.stdout.startswith(b"pong from honey: seq=1")
    hello = run("rpc", "honey", "hello", env=env)
    assert hello.returncode == 0 and json.loads(hello.stdout)["name"] == "cmuxd-remote"
    bridged = subprocess.run(daemon_command("connect", "honey", "--stdio"),
                             input=b'{"id":1,"method":"ping"}\n', capture_output=True,
                             env=env, timeout=30)
    assert json.loads(bridged.stdout) == {"id": 1, "ok": True, "result": {"pong": True}}
    # The same fleet file found at its default place, ~/.config/cmuxd/cmux.json.
    (tmp_path / ".config" / "cmuxd").mkdir(parents=True)
    fleet.rename(tmp_path / ".config" / "cmuxd" / "cmux.json")
    assert run("ping", "honey", "-c", "1", env=client_env(tmp_path)).returncode == 0
    assert d.token.encode() not in ping.stdout + ping.stderr + hello.stderr


def test_fleet_status_reports_each_host_and_fails_when_one_is_down(spawn_listening, tmp_path):
    a, b = spawn_listening(workers=1), spawn_listening(workers=2)
    closed = free_port()
    wrong = tmp_path / "wrong-token"
    wrong.write_text("cd" * 32 + "\n")
    wrong.chmod(0o600)
    fleet = write_fleet(tmp_path / "cmux.json", {
        "alpha": (f"cmux://127.0.0.1:{a.port}", a.token_file),
        "bravo": (f"cmux://127.0.0.1:{b.port}", b.token_file),
        "charlie": (f"cmux://127.0.0.1:{closed}", a.token_file),
        "delta": (f"cmux://127.0.0.1:{b.port}", wrong),
    })
    env = client_env(tmp_path, fleet)
    table = run("fleet", "status", env=env)
    assert table.returncode == 3, table.stderr
    lines = table.stdout.decode().splitlines()
    assert lines[0].split() == ["HOST", "ADDRESS", "STATE", "RTT", "VERSION", "UPTIME",
                                "WORKERS", "CONNS"]
    rows = {line.split()[0]: line for line in lines[1:5]}
    assert rows["alpha"].split()[2] == "up" and rows["alpha"].split()[6] == "1"
    assert rows["bravo"].split()[2] == "up" and rows["bravo"].split()[6] == "2"
    assert rows["charlie"].split()[2] == "down" and "connection refused" in rows["charlie"]
    assert rows["delta"].split()[2] == "auth" and "refused the credentials" in rows["delta"]
    assert lines[-1] == "4 hosts: 2 up, 2 not up"
    # Every column starts at the same place on every line.
    starts = [line.index(line.split()[1]) for line in lines[:5]]
    assert len(set(starts)) == 1

    result = run("fleet", "status", "--json", env=env)
    assert result.returncode == 3
    report = json.loads(result.stdout)
    assert (report["up"], report["not_up"]) == (2, 2)
    by_name = {h["name"]: h for h in report["hosts"]}
    alpha = by_name["alpha"]
    assert alpha["state"] == "up" and alpha["version"] and alpha["error"] is None
    assert alpha["workers"] == 1 and alpha["connections"] >= 1 and alpha["rtt_ms"] > 0
    assert by_name["charlie"]["state"] == "down" and by_name["charlie"]["rtt_ms"] is None

    # A subset of the fleet, all up: exit 0.
    subset = run("fleet", "status", "alpha", "bravo", env=env)
    assert subset.returncode == 0 and subset.stdout.decode().endswith("2 hosts: 2 up\n")
    unknown = run("fleet", "status", "zulu", env=env)
    assert unknown.returncode == 2 and b"zulu is not a host of" in unknown.stderr
    for out in (table, result):
        assert a.token.encode() not in out.stdout + out.stderr


def test_fleet_status_without_a_fleet_file_says_how_to_make_one(tmp_path):
    result = run("fleet", "status", env=client_env(tmp_path))
    assert result.returncode == 2
    assert b"no fleet file at" in result.stderr and b"fleet config" in result.stderr


def test_fleet_status_gives_a_silent_host_only_its_timeout(tmp_path):
    """A listener that accepts but never speaks: the host is reported as timed out, and the
    other hosts are still checked."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        token = tmp_path / "token"
        token.write_text("ab" * 32 + "\n")
        token.chmod(0o600)
        fleet = write_fleet(tmp_path / "cmux.json",
                            {"mute": (f"cmux://127.0.0.1:{silent.getsockname()[1]}", token)})
        result = run("fleet", "status", "--timeout", "0.5", "--json",
                     env=client_env(tmp_path, fleet))
        assert result.returncode == 3
        (host,) = json.loads(result.stdout)["hosts"]
        assert host["state"] == "timeout" and "0.5 s" in host["error"]
    finally:
        silent.close()
