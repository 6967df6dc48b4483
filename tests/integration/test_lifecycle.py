"""Lifecycle under faults, with real processes: worker death, hangs, reload, recycling,
limits and resource use of the supervisor."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil

from helpers import wait_for
from listening import read_line, refused


class PingLoop(threading.Thread):
    """One authenticated connection pinging in a loop until told to stop."""

    def __init__(self, daemon):
        super().__init__(daemon=True)
        self.stream = daemon.authed()
        self.ok = 0
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self):
        n = 0
        try:
            while not self.halt.is_set():
                n += 1
                reply = self.stream.call("ping", id=n, timeout=10)
                assert reply == {"id": n, "ok": True, "result": {"pong": True}}, reply
                self.ok += 1
        except BaseException as exc:  # inspected by the test
            self.error = exc


def test_killed_worker_loses_only_its_connections(spawn_listening):
    d = spawn_listening(workers=2)
    loops = [PingLoop(d) for _ in range(50)]
    for l in loops:
        l.start()
    wait_for(lambda: all(l.ok > 2 for l in loops), timeout=20)
    pids = [w["pid"] for w in d.status()["workers"]]
    victim = pids[0]
    victim_ports = {c.raddr.port for c in psutil.Process(victim).net_connections(kind="tcp")
                    if c.raddr}
    os.kill(victim, signal.SIGKILL)
    # New connections succeed throughout the replacement.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        s = d.authed()
        assert s.call("ping", id=1)["ok"] is True
        s.close()
    time.sleep(0.3)
    for l in loops:
        l.halt.set()
    for l in loops:
        l.join(15)
    on_victim = [l for l in loops if l.stream.local_port in victim_ports]
    elsewhere = [l for l in loops if l.stream.local_port not in victim_ports]
    assert on_victim and elsewhere
    assert all(l.error is not None for l in on_victim)
    assert all(l.error is None for l in elsewhere), [l.error for l in elsewhere if l.error]
    wait_for(lambda: len([w for w in d.status()["workers"] if w["alive"]]) == 2, timeout=5)
    assert victim not in [w["pid"] for w in d.status()["workers"]]
    assert "exited with SIGKILL" in d.log()


def test_hung_worker_is_replaced_after_the_timeout(spawn_listening):
    d = spawn_listening("--worker-timeout", "2", workers=2)
    victim = d.status()["workers"][0]["pid"]
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_for(lambda: victim not in [w["pid"] for w in d.status()["workers"]], timeout=10)
        wait_for(lambda: all(w["alive"] for w in d.status()["workers"])
                 and len(d.status()["workers"]) == 2, timeout=10)
    finally:
        if psutil.pid_exists(victim):
            os.kill(victim, signal.SIGCONT)
    assert "has not answered" in d.log()
    s = d.authed()
    assert s.call("ping", id=1)["ok"] is True


def test_reload_under_load_fails_no_request(spawn_listening):
    d = spawn_listening("--graceful-timeout", "30", workers=2)
    loops = [PingLoop(d) for _ in range(20)]
    for l in loops:
        l.start()
    wait_for(lambda: all(l.ok > 2 for l in loops), timeout=20)
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_for(lambda: d.status()["generation"] == 2, timeout=10)
    before = [l.ok for l in loops]
    wait_for(lambda: all(l.ok > b + 20 for l, b in zip(loops, before)), timeout=20)
    status = d.status()
    gens = {w["generation"]: w["state"] for w in status["workers"]}
    assert gens.get(2) == "serving" and gens.get(1) == "retiring"
    fresh = d.authed()
    assert fresh.call("ping", id=1)["ok"] is True
    for l in loops:
        l.halt.set()
    for l in loops:
        l.join(15)
    assert all(l.error is None for l in loops), [l.error for l in loops if l.error]
    for l in loops:
        l.stream.close()
    # With their connections gone, the old generation exits.
    wait_for(lambda: all(w["generation"] == 2 for w in d.status()["workers"]), timeout=15)


def test_ten_thousand_auth_cycles_leave_the_supervisor_flat(spawn_listening):
    d = spawn_listening(workers=2)
    sup = psutil.Process(d.proc.pid)

    def cycles(n):
        for _ in range(n):
            d.authed().close()

    cycles(500)
    fds0, rss0 = sup.num_fds(), sup.memory_info().rss
    threads = [threading.Thread(target=cycles, args=(2375,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_for(lambda: d.status()["connections"] == 0, timeout=15)
    fds1, rss1 = sup.num_fds(), sup.memory_info().rss
    assert d.status()["counters"]["authenticated"] >= 10000
    assert fds1 <= fds0 + 2, (fds0, fds1)
    assert rss1 - rss0 < 8 * 1024 * 1024, (rss0, rss1)


def test_worker_out_of_fds_closes_what_it_cannot_take(spawn_listening):
    """At its fd limit a worker cannot receive another connection: that client sees its
    connection end at once instead of hanging after the handshake, the refusal is counted
    and logged with the fix, and nothing is left held once the clients are gone."""
    d = spawn_listening(workers=1, fd_limit=(48, 48))
    sup = psutil.Process(d.proc.pid)
    fds0 = sup.num_fds()
    served, ended = [], 0
    for n in range(60):
        try:
            stream = d.authed()
        except (OSError, EOFError):  # the supervisor itself at its limit: refused at accept
            ended += 1
            continue
        try:
            assert stream.call("ping", id=n, timeout=10)["ok"] is True
            served.append(stream)
        except (EOFError, ConnectionError):  # closed, or reset since our ping was unread
            ended += 1
            stream.close()
    assert len(served) >= 15 and ended >= 1, (len(served), ended)
    wait_for(lambda: d.status()["counters"].get("refused_fd_limit", 0) >= 1)
    assert "out of file descriptors" in d.log()
    for stream in served:
        stream.close()
    wait_for(lambda: d.status()["connections"] == 0, timeout=15)
    wait_for(lambda: sup.num_fds() <= fds0 + 2, timeout=15,
             message="the supervisor still holds copies of lost connections")
    assert d.authed().call("ping", id=1)["ok"] is True


def test_workers_raise_their_fd_limit_and_the_hub_keeps_its_own(spawn_listening):
    """Workers hold the connections, so they take the hard limit; the hub keeps the limit
    it was given, so the shells it starts get the one their user expects."""
    d = spawn_listening(workers=1, fd_limit=(256, 4096))
    worker = psutil.Process(d.status()["workers"][0]["pid"])
    hub = next(p for p in psutil.Process(d.proc.pid).children()
               if "cmuxd.hub_process" in " ".join(p.cmdline()))
    wait_for(lambda: worker.rlimit(psutil.RLIMIT_NOFILE) == (4096, 4096))
    assert hub.rlimit(psutil.RLIMIT_NOFILE) == (256, 4096)
    assert psutil.Process(d.proc.pid).rlimit(psutil.RLIMIT_NOFILE) == (256, 4096)


def test_worker_over_rss_limit_is_recycled_gracefully(spawn_listening):
    d = spawn_listening("--max-worker-rss", "1", "--graceful-timeout", "30", workers=1)
    first = d.status()["workers"][0]["pid"]
    stream = d.authed()
    assert stream.call("ping", id=1)["ok"] is True
    wait_for(lambda: any(w["pid"] != first and w["state"] == "serving"
                         for w in d.status()["workers"]), timeout=15)
    # The old worker keeps serving the connection it already had.
    assert stream.call("ping", id=2)["ok"] is True
    assert "--max-worker-rss" in d.log()


def test_max_connections_refuses_with_a_reason(spawn_listening):
    d = spawn_listening("--max-connections", "3", workers=1)
    held = [d.authed() for _ in range(3)]
    wait_for(lambda: d.status()["connections"] == 3)
    sock = d.tcp_connect()
    reply = json.loads(refused(sock))
    assert reply["ok"] is False and "--max-connections" in reply["error"]["message"]
    for s in held:
        assert s.call("ping", id=1)["ok"] is True
    out = d.cli("ping", f"127.0.0.1:{d.port}", "-c", "1")
    assert out.returncode == 3, out
    assert b"not taking connections now" in out.stderr and b"--max-connections" in out.stderr
    held[0].close()
    wait_for(lambda: d.status()["connections"] == 2)
    assert d.authed().call("ping", id=1)["ok"] is True


def test_outsiders_learn_nothing_of_the_connection_limit(spawn_listening):
    """A peer --allow-from closes out gets the same silent close at the limit as below it."""
    d = spawn_listening("--allow-from", "10.0.0.0/8", "--max-connections", "1", workers=1)
    held = d.unix()
    assert held.call("ping", id=1)["ok"] is True
    wait_for(lambda: d.status()["connections"] == 1)
    assert refused(d.tcp_connect()) == b""
    assert d.status()["counters"].get("refused_not_allowed") == 1
    assert "refused_max_connections" not in d.status()["counters"]
    assert held.call("ping", id=2)["ok"] is True


def test_no_worker_running_is_said_before_the_challenge(spawn_listening):
    """While crashed workers wait out their restart back-off, a client is told so at once
    instead of being authenticated and then dropped."""
    d = spawn_listening(workers=1)
    killed: set[int] = set()
    told = None
    for _ in range(10):
        pid = wait_for(lambda: next((w["pid"] for w in d.status()["workers"]
                                     if w["state"] == "serving" and w["pid"] not in killed),
                                    None), timeout=30)
        killed.add(pid)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: all(w["pid"] != pid or not w["alive"] for w in d.status()["workers"]))
        sock = d.tcp_connect()
        first = json.loads(read_line(sock))
        sock.close()
        if "error" in first:
            told = first
            break
    assert told is not None, "every reconnect found a worker already back"
    assert told["ok"] is False and told["error"]["code"] == "unavailable"
    assert "no worker running" in told["error"]["message"]
    assert d.status()["counters"].get("refused_no_worker", 0) >= 1
    wait_for(lambda: any(w["state"] == "serving" and w["alive"] for w in d.status()["workers"]),
             timeout=30)
    assert d.authed().call("ping", id=1)["ok"] is True
    assert "Traceback" not in d.log()


def test_ttin_ttou_change_the_worker_count(spawn_listening):
    d = spawn_listening(workers=1)
    os.kill(d.proc.pid, signal.SIGTTIN)
    wait_for(lambda: len([w for w in d.status()["workers"] if w["state"] == "serving"]) == 2)
    os.kill(d.proc.pid, signal.SIGTTOU)
    wait_for(lambda: len(d.status()["workers"]) == 1, timeout=15)


def test_status_command_prints_table_and_json(spawn_listening):
    d = spawn_listening(workers=2)
    wait_for(lambda: d.status()["hub"]["connected"] and
             all(w["version"] for w in d.status()["workers"]))
    out = d.cli("status", "--state-dir", str(d.state_dir))
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert "WORKER" in text and f"127.0.0.1:{d.port}" in text
    # Which code each process runs: the workers' and the PTY hub's.
    from cmuxd import __version__
    assert text.count(f" {__version__}\n") >= 2 and f"PTY hub: pid {d.status()['hub']['pid']}, " \
        f"{__version__}, 0 session(s), connected" in text
    out = d.cli("status", "--json", "--state-dir", str(d.state_dir))
    data = json.loads(out.stdout)
    assert data["pid"] == d.proc.pid and len(data["workers"]) == 2
    out = d.cli("status", "--state-dir", str(d.dir / "nowhere"))
    assert out.returncode == 3 and b"no daemon answers" in out.stderr


def test_hung_pty_hub_is_replaced_after_the_timeout(spawn_listening):
    d = spawn_listening("--worker-timeout", "2", workers=1)

    def hub_pid():
        hubs = []
        for child in psutil.Process(d.proc.pid).children():
            try:
                if "cmuxd.hub_process" in " ".join(child.cmdline()) and \
                        child.status() != psutil.STATUS_ZOMBIE:
                    hubs.append(child.pid)
            except psutil.Error:
                continue
        return hubs[0] if len(hubs) == 1 else None

    # Hung once it serves: a hub stopped while starting is waited for as a slow start (10 s).
    wait_for(lambda: d.status()["hub"]["connected"], message="the hub link")
    victim = wait_for(hub_pid)
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_for(lambda: hub_pid() not in (None, victim), timeout=15)
    finally:
        if psutil.pid_exists(victim):
            os.kill(victim, signal.SIGCONT)
    assert "PTY hub" in d.log() and "has not answered" in d.log()
    s = d.authed()
    r = s.call("pty.attach", {"session_id": "after", "attachment_id": "a",
                              "client_attachment_token": "t", "cols": 80, "rows": 24,
                              "command": "exec cat"}, timeout=15)
    assert r["ok"], r
