"""PTY sessions across the whole daemon: the hub process shared by every worker."""

from __future__ import annotations

import base64
import os
import pty
import select
import signal
import subprocess
import threading
import time

import orjson
import psutil

from helpers import stop_process, wait_for
from listening import ListeningDaemon


def collect(stream, want: bytes, timeout: float = 10) -> bytes:
    """PTY output of one attachment until `want` appears (searched only where it can end)."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        ev = stream.next_event("pty.data", timeout=max(0.1, deadline - time.monotonic()))
        start = max(0, len(out) - len(want))
        out += base64.b64decode(ev["data_base64"])
        if want in out[start:]:
            return bytes(out)


def ident(aid, tok):
    return {"session_id": "shared", "attachment_id": aid, "client_attachment_token": tok}


def on_worker(d, stream) -> int:
    """The pid of the worker holding this client's connection."""
    def owner():
        for w in d.status()["workers"]:
            conns = psutil.Process(w["pid"]).net_connections("tcp")
            if any(c.raddr and c.raddr.port == stream.local_port for c in conns):
                return w["pid"]
        return None
    return wait_for(owner)


def test_session_shared_across_workers_and_survives_a_worker_crash():
    d = ListeningDaemon(workers=2).wait_ready()
    try:
        a = d.authed()
        b = d.authed()
        assert on_worker(d, a) != on_worker(d, b)  # least-loaded: one per worker
        r = a.call("pty.attach", dict(ident("a", "ta"), cols=100, rows=40,
                                      command="exec /bin/sh"))
        assert r["ok"], r
        r = b.call("pty.attach", dict(ident("b", "tb"), cols=90, rows=50,
                                      require_existing=True))
        assert r["ok"], r
        b.send({"method": "pty.write", "params": dict(
            ident("b", "tb"), data_base64=base64.b64encode(b"stty size; echo m-$((6*7))\n").decode())})
        assert b"40 90" in collect(a, b"m-42")
        assert b"m-42" in collect(b, b"m-42")
        # Kill the worker serving `a`: its connection ends, the session does not.
        os.kill(on_worker(d, a), signal.SIGKILL)
        wait_for(lambda: len([w for w in d.status()["workers"] if w["alive"]]) == 2, timeout=10)
        c = d.authed()
        r = c.call("pty.attach", dict(ident("c", "tc"), cols=80, rows=24, require_existing=True))
        assert r["ok"] and r["result"]["replay_bytes"] > 0, r
        assert b"m-42" in collect(c, b"m-42")
        listed = c.call("pty.list")["result"]["sessions"]
        assert [s["session_id"] for s in listed] == ["shared"]
    finally:
        d.close()


def test_killing_the_worker_reading_a_session_again_and_again_never_locks_it():
    """A lone attachment's worker holds the session's read lease; each time it is killed the
    hub reads again, and the next attach (from another worker) gets in and sees output."""
    d = ListeningDaemon(workers=2).wait_ready()
    try:
        s = d.authed()
        assert s.call("pty.attach", dict(ident("a", "t0"), cols=80, rows=24,
                                         command="exec /bin/sh"))["ok"]
        for round in range(1, 4):
            wait_for(lambda: all(w["alive"] for w in d.status()["workers"]), timeout=10)
            reader = on_worker(d, s)
            os.kill(reader, signal.SIGKILL)
            wait_for(lambda: reader not in {w["pid"] for w in d.status()["workers"]}, timeout=10)
            s = d.authed()
            r = s.call("pty.attach", dict(ident("a", f"t{round}"), cols=80, rows=24,
                                          require_existing=True))
            assert r["ok"], r
            s.send({"method": "pty.write", "params": dict(
                ident("a", f"t{round}"), data_base64=base64.b64encode(
                    f"echo round-$((0+{round}))\n".encode()).decode())})
            assert f"round-{round}".encode() in collect(s, f"round-{round}\r\n".encode())
    finally:
        d.close()


def test_sessions_outlive_a_stop_and_the_next_daemon_adopts_them():
    """A stop (or restart) of the daemon leaves its PTY sessions running: the next daemon on
    the same state directory adopts the hub, and a reattach replays; `hub stop` ends them."""
    d = ListeningDaemon(workers=1).wait_ready()
    try:
        s = d.authed()
        r = s.call("pty.attach", dict(ident("a", "t"), cols=80, rows=24,
                                      command="echo pid=$$; while :; do echo tick; sleep 0.1; done"))
        assert r["ok"], r
        out = collect(s, b"pid=")
        pid = int(out.split(b"pid=")[1].split()[0])
        assert d.stop() == 0
        time.sleep(0.5)
        assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        again = subprocess.Popen(d.proc.args, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: d.socket_path.exists(), timeout=15)
            c = d.authed()
            r = c.call("pty.attach", dict(ident("b", "t"), cols=80, rows=24,
                                          require_existing=True), timeout=15)
            assert r["ok"] and r["result"]["replay_bytes"] > 0, r
            assert f"pid={pid}".encode() in collect(c, f"pid={pid}".encode())
            ended = d.cli("hub", "stop", "--state-dir", str(d.state_dir))
            assert ended.returncode == 0, ended.stderr
            assert c.next_event("pty.exit", timeout=10)["attachment_id"] == "b"
            wait_for(lambda: not psutil.pid_exists(pid) or
                     psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, timeout=10)
        finally:
            stop_process(again)
    finally:
        d.close()


def test_hub_stop_without_a_hub_says_so(tmp_path):
    d = ListeningDaemon(workers=1)
    try:
        out = d.cli("hub", "stop", "--state-dir", str(tmp_path / "none"))
        assert out.returncode == 3 and b"no PTY hub serves" in out.stderr
    finally:
        d.close()


def test_attach_command_is_interactive_and_detaches():
    d = ListeningDaemon(workers=1).wait_ready()
    try:
        pid, fd = pty.fork()
        if pid == 0:
            os.execvpe(d.cli_command()[0], d.cli_command() + [
                "attach", f"cmux://127.0.0.1:{d.port}", "tty1", "--command", "exec /bin/sh"],
                d.client_env())
        out = b""

        def pump(until: bytes, timeout: float = 10) -> None:
            nonlocal out
            deadline = time.monotonic() + timeout
            while until not in out and time.monotonic() < deadline:
                ready, _, _ = select.select([fd], [], [], 0.1)
                if ready:
                    try:
                        out += os.read(fd, 65536)
                    except OSError:
                        return

        pump(b"# ")
        os.write(fd, b"echo marker-$((40+2))\r")
        pump(b"marker-42\r\n")
        os.write(fd, b"\x1d")
        pump(b"[detached")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert b"marker-42" in out and b"[detached: session tty1]" in out
        # Detached, not ended: the session is still there.
        s = d.authed()
        assert [x["session_id"] for x in s.call("pty.list")["result"]["sessions"]] == ["tty1"]
    finally:
        d.close()


def test_reconnect_replays_scrollback_exactly_once():
    d = ListeningDaemon(workers=2).wait_ready()
    try:
        a = d.authed()
        assert a.call("pty.attach", dict(ident("a", "ta"), cols=80, rows=24,
                                         command="echo before-$((1+1)); exec cat"))["ok"]
        collect(a, b"before-2")
        a.close()  # the laptop sleeps: the connection drops without a detach
        b = d.authed()
        r = b.call("pty.attach", dict(ident("a2", "tb"), cols=80, rows=24, require_existing=True))
        assert r["ok"] and r["result"]["replay_bytes"] > 0, r
        assert b.next_event("pty.ready")
        b.send({"method": "pty.write", "params": dict(
            ident("a2", "tb"), data_base64=base64.b64encode(b"after\n").decode())})
        out = collect(b, b"after\r\nafter")  # the tty echo, then cat's copy
        assert out.count(b"before-2") == 1
        assert out.count(b"after") == 2
    finally:
        d.close()


def test_twenty_mib_reaches_two_attachments_and_a_stalled_one_is_dropped():
    d = ListeningDaemon(workers=2).wait_ready()
    try:
        size = 20 * 1024 * 1024
        stalled = d.authed()
        fast1, fast2 = d.authed(), d.authed()
        cmd = f"read go; head -c {size} /dev/zero | tr '\\0' x; echo; echo END-MARK; exec cat"
        assert fast1.call("pty.attach", dict(ident("f1", "t1"), cols=200, rows=50,
                                             command=cmd))["ok"]
        assert fast2.call("pty.attach", dict(ident("f2", "t2"), cols=200, rows=50,
                                             require_existing=True))["ok"]
        assert stalled.call("pty.attach", dict(ident("s", "t3"), cols=200, rows=50,
                                               require_existing=True))["ok"]
        fast1.send({"method": "pty.write", "params": dict(
            ident("f1", "t1"), data_base64=base64.b64encode(b"\n").decode())})
        # `stalled` reads nothing from here on; the other two, each read by its own thread,
        # must still get every byte.
        results = {}

        def read_all(name, stream):
            results[name] = collect(stream, b"END-MARK", timeout=90).count(b"x")

        readers = [threading.Thread(target=read_all, args=(n, s))
                   for n, s in (("f1", fast1), ("f2", fast2))]
        for t in readers:
            t.start()
        for t in readers:
            t.join(100)
        assert results == {"f1": size, "f2": size}
        exits = []
        deadline = time.monotonic() + 30
        while not exits and time.monotonic() < deadline:
            ev = stalled.next_event(timeout=30)
            if ev["event"] == "pty.exit":
                exits.append(ev)
        assert exits and exits[0]["attachment_id"] == "s"
    finally:
        d.close()


def test_a_hub_crash_ends_attachments_and_a_new_hub_takes_over():
    d = ListeningDaemon(workers=1).wait_ready()
    try:
        s = d.authed()
        assert s.call("pty.attach", dict(ident("a", "t"), cols=80, rows=24,
                                         command="exec cat"))["ok"]
        hubs = [p for p in psutil.Process(d.proc.pid).children()
                if "cmuxd.hub_process" in " ".join(p.cmdline())]
        assert len(hubs) == 1
        hubs[0].kill()
        assert s.next_event("pty.exit", timeout=10)["attachment_id"] == "a"
        r = s.call("pty.attach", dict(ident("b", "t"), cols=80, rows=24,
                                      command="echo again; exec cat"), timeout=15)
        assert r["ok"], r
        assert b"again" in collect(s, b"again")
        assert "PTY hub" in d.log() and "sessions are lost" in d.log()
    finally:
        d.close()


def test_a_write_near_the_frame_limit_crosses_the_hub_link():
    d = ListeningDaemon(workers=1).wait_ready()
    try:
        a, b = d.authed(), d.authed()
        assert a.call("pty.attach", dict(ident("a", "ta"), cols=80, rows=24,
                                         command="exec cat > /dev/null"))["ok"]
        assert b.call("pty.attach", dict(ident("b", "tb"), cols=80, rows=24,
                                         require_existing=True))["ok"]
        data = base64.b64encode(b"y" * (3 * 1024 * 1024 - 4096)).decode()  # ~4 MiB frame
        r = a.call("pty.write", dict(ident("a", "ta"), data_base64=data), timeout=30)
        assert r == {"id": r["id"], "ok": True, "result": {"written": 3 * 1024 * 1024 - 4096}}, \
            r.get("error")
        # The link survived: both attachments still work.
        assert b.call("pty.resize", dict(ident("b", "tb"), cols=70, rows=20))["ok"]
        assert a.call("pty.list")["result"]["sessions"][0]["effective_cols"] == 70
    finally:
        d.close()


def test_the_hub_starts_pty_processes_without_helper_threads():
    """Code runs between fork and exec to take the controlling terminal; that is only safe in
    a process with one thread, so children are watched with pidfds, not a thread each."""
    d = ListeningDaemon(workers=1).wait_ready()
    try:
        s = d.authed()
        for n in range(3):
            r = s.call("pty.attach", {"session_id": f"s{n}", "attachment_id": "a",
                                      "client_attachment_token": "t", "cols": 80, "rows": 24,
                                      "command": "exec cat"})
            assert r["ok"], r
        hub = [p for p in psutil.Process(d.proc.pid).children()
               if "cmuxd.hub_process" in " ".join(p.cmdline())][0]
        assert hub.num_threads() == 1
    finally:
        d.close()


def test_requests_get_through_to_a_slow_reader_of_a_flooding_terminal():
    """A client reading slower than its terminal writes still gets its requests served: a
    Ctrl-C reaches the terminal at once (not after the output it is meant to stop) and a
    ping is answered, while the output keeps the connection's write buffer full."""
    d = ListeningDaemon(workers=1).wait_ready()
    try:
        sock = d.authed().sock
        sock.sendall(orjson.dumps({"id": 1, "method": "pty.attach", "params": dict(
            ident("a", "tok"), cols=80, rows=24,
            command="trap 'echo INTERRUPTED; exit 0' INT; yes flood-line")}) + b"\n")
        seen = bytearray()

        def read_slowly(done, seconds: float, what: str) -> None:
            """Read about 1.6 MB/s until `done()`."""
            t0 = time.monotonic()
            while not done():
                assert time.monotonic() - t0 < seconds, f"{what} within {seconds} s"
                chunk = sock.recv(8192)
                assert chunk, "the daemon closed the connection"
                seen.extend(chunk)
                time.sleep(0.005)

        def flooding() -> list:
            found = []
            for p in psutil.Process(d.proc.pid).children(recursive=True):
                try:
                    if p.name() == "yes" and p.status() != psutil.STATUS_ZOMBIE:
                        found.append(p)
                except psutil.NoSuchProcess:  # one that ended since it was listed
                    pass
            return found

        read_slowly(lambda: b'"pty.data"' in seen and flooding(), 10, "no output")
        t0 = time.monotonic()
        read_slowly(lambda: time.monotonic() - t0 > 1.0, 2, "")  # buffers fill meanwhile
        sock.sendall(b'{"id":7,"method":"ping"}\n' + orjson.dumps({
            "method": "pty.write", "params": dict(ident("a", "tok"), data_base64="Aw==")})
            + b"\n")
        read_slowly(lambda: not flooding(), 2, "the Ctrl-C did not reach the terminal")
        pong = b'{"id":7,"ok":true,"result":{"pong":true}}'
        read_slowly(lambda: pong in seen[-(len(pong) + 8192 * 3):], 15, "no pong")
        sock.settimeout(10)
        while b'"pty.exit"' not in seen[-8192 * 4:]:
            chunk = sock.recv(1 << 20)
            assert chunk, "the daemon closed the connection"
            seen.extend(chunk)
    finally:
        d.close()


def test_failed_notifications_become_pty_error_events_across_the_link():
    d = ListeningDaemon(workers=1).wait_ready()
    try:
        s = d.authed()
        assert s.call("pty.attach", dict(ident("a", "tok"), cols=80, rows=24, command="exec cat",
                                         input_seq_ack=True))["ok"]
        s.send({"method": "pty.write", "params": dict(ident("a", "WRONG"), data_base64="eA==")})
        err = s.next_event("pty.error")
        assert err == {"event": "pty.error", "session_id": "shared", "attachment_id": "a",
                       "attachment_token": "WRONG", "error": "PTY attachment not found",
                       "message": "PTY attachment not found", "code": "not_found"}
        # A sequence gap in notification form also detaches the attachment: pty.error first,
        # then pty.exit, its last event.
        s.send({"method": "pty.write", "params": dict(ident("a", "tok"), data_base64="eA==",
                                                      seq=5)})
        err = s.recv_frame()
        assert err["event"] == "pty.error" and err["code"] == "pty_input_seq_gap"
        assert err["message"] == "PTY input sequence gap: got 5, want 1"
        exit_ = s.recv_frame()
        assert exit_["event"] == "pty.exit" and exit_["attachment_token"] == "tok"
        assert s.call("pty.list")["result"]["sessions"][0]["attachments"] == []
    finally:
        d.close()


def test_a_hub_run_by_its_own_unit_outlives_its_daemons_until_stopped():
    """`hub run` (the cmuxd-hub unit) does not end when it is alone, as a hub a daemon started
    does: an `--external-hub` daemon never starts another, so a hub that left during a slow
    restart would leave the next daemon without PTY sessions for good."""
    from cmuxd.hub_process import ALONE_GRACE
    from cmuxd.status import query_status
    from helpers import daemon_command

    d = ListeningDaemon("--external-hub", workers=1).wait_ready()
    hub = subprocess.Popen(daemon_command("hub", "run", "--state-dir", str(d.state_dir)),
                           stdin=subprocess.DEVNULL, env=d.env)
    again = None
    try:
        wait_for(lambda: d.status()["hub"]["connected"], timeout=15,
                 message="the daemon to adopt the hub")
        assert d.status()["hub"]["pid"] == hub.pid
        assert d.stop() == 0
        time.sleep(ALONE_GRACE + 1.5)
        assert hub.poll() is None, "the hub ended when its daemon went away"
        again = subprocess.Popen(d.proc.args, stdin=subprocess.DEVNULL, env=d.env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        control = d.state_dir / "control.sock"
        wait_for(lambda: control.exists() and
                 query_status(control)["hub"]["pid"] == hub.pid, timeout=15,
                 message="the next daemon to adopt the same hub")
        s = d.authed()
        assert s.call("pty.attach", dict(ident("a", "t"), cols=80, rows=24,
                                         command="echo pid=$$; exec cat"), timeout=15)["ok"]
        pid = int(collect(s, b"pid=").split(b"pid=")[1].split()[0])
        assert psutil.Process(pid).ppid() == hub.pid
        assert not [p for p in psutil.Process(again.pid).children(recursive=True)
                    if "cmuxd.hub_process" in " ".join(p.cmdline())]
        ended = d.cli("hub", "stop", "--state-dir", str(d.state_dir))
        assert ended.returncode == 0, ended.stderr
        assert hub.wait(15) == 0
        assert s.next_event("pty.exit", timeout=10)["attachment_id"] == "a"
    finally:
        if again is not None:
            stop_process(again)
        stop_process(hub)
        d.close()
