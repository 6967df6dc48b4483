"""Sessions outlive the daemon's code: a live upgrade (SIGHUP), a refused broken upgrade, and
a stop and start, against a copy of the package installed where the test can change it."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import orjson
import psutil
import pytest

import cmuxd
from helpers import FrameStream, stop_process, wait_for
from listening import RELAY_ID, ListeningDaemon, mac_for, read_line

COUNTER = "echo pid=$$; while :; do echo tick $((i+=1)); sleep 0.2; done"


@pytest.fixture
def installed(tmp_path):
    """A copy of the package on PYTHONPATH, ahead of the development install."""
    site = tmp_path / "site"
    shutil.copytree(Path(cmuxd.__file__).parent, site / "cmuxd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return site


def set_version(site: Path, version: str) -> None:
    init = site / "cmuxd" / "__init__.py"
    text = re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text())
    init.write_text(text)


def ready(d: ListeningDaemon) -> ListeningDaemon:
    """Workers up and the supervisor's link to the hub too (status says the hub's pid)."""
    d.wait_ready()
    wait_for(lambda: d.status()["hub"]["connected"], timeout=20)
    return d


def attach(d, name: str, **extra):
    s = d.authed()
    r = s.call("pty.attach", {"session_id": "counter", "attachment_id": name,
                              "client_attachment_token": "t", "cols": 80, "rows": 24, **extra},
               timeout=15)
    assert r["ok"], r
    return s


def replay_of(s, until: bytes) -> bytes:
    out = bytearray()
    deadline = time.monotonic() + 15
    while until not in out and time.monotonic() < deadline:
        ev = s.next_event("pty.data", timeout=15)
        out += base64.b64decode(ev["data_base64"])
    return bytes(out)


def ticks(output: bytes) -> list[int]:
    return [int(n) for n in re.findall(rb"tick (\d+)\r\n", output)]


def assert_no_gap(output: bytes) -> None:
    seen = ticks(output)
    assert seen and seen == list(range(seen[0], seen[0] + len(seen))), seen


class Dialer(threading.Thread):
    """A client connecting every 20 ms, counting the attempts that failed."""

    def __init__(self, d):
        super().__init__(daemon=True)
        self.d, self.stop, self.tried, self.failed = d, threading.Event(), 0, []

    def run(self):
        while not self.stop.is_set():
            self.tried += 1
            try:
                s = self.d.authed()
                assert s.call("ping", id=1)["ok"]
                s.sock.close()
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                self.failed.append(repr(exc))
            time.sleep(0.02)


def test_a_live_upgrade_runs_the_new_code_and_loses_nothing(installed):
    d = ready(ListeningDaemon(workers=2, env={"PYTHONPATH": str(installed)}))
    dialer = Dialer(d)
    try:
        first = attach(d, "a", command=COUNTER)
        seen = replay_of(first, b"tick 2")
        pid = int(re.search(rb"pid=(\d+)", seen).group(1))
        hub_pid = d.status()["hub"]["pid"]
        old = d.authed()  # opened before: stays open, served by the old generation
        dialer.start()
        set_version(installed, "9.9.9")
        d.proc.send_signal(1)
        wait_for(lambda: d.status()["hub"]["version"] == "9.9.9", timeout=20)
        wait_for(lambda: all(w["version"] == "9.9.9" for w in d.status()["workers"]
                             if w["state"] == "serving"), timeout=20)
        status = d.status()
        assert any(w["version"] == cmuxd.__version__ and w["state"] == "retiring"
                   for w in status["workers"]), status["workers"]
        assert status["hub"]["pid"] == hub_pid
        # The supervisor re-executed itself in place: same pid, the new code.
        assert status["pid"] == d.proc.pid and status["version"] == "9.9.9"
        assert "took over from" in d.log()
        assert old.call("ping", id=7)["ok"]
        time.sleep(1)
        dialer.stop.set()
        dialer.join()
        assert dialer.tried > 20 and dialer.failed == []
        # The attachment made before the upgrade went on through it: no pty.exit, no gap.
        last = ticks(seen)[-1]
        seen += replay_of(first, f"tick {last + 15}\r\n".encode())
        assert not [e for e in first.events if e["event"] == "pty.exit"]
        assert_no_gap(seen)
        again = attach(d, "b", require_existing=True)
        out = replay_of(again, b"tick")
        out += replay_of(again, b"tick")
        assert f"pid={pid}".encode() in out
        assert_no_gap(out)
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    finally:
        dialer.stop.set()
        d.close()


def test_a_broken_upgrade_is_refused_and_changes_nothing(installed):
    d = ready(ListeningDaemon(workers=1, env={"PYTHONPATH": str(installed)}))
    try:
        first = attach(d, "a", command=COUNTER)
        replay_of(first, b"tick 2")
        before = d.status()
        broken = installed / "cmuxd" / "hub_process.py"
        broken.write_text(broken.read_text() + "\nraise ImportError('broken on purpose')\n")
        d.proc.send_signal(1)
        wait_for(lambda: d.status()["counters"].get("reloads_refused") == 1, timeout=20)
        after = d.status()
        assert after["generation"] == before["generation"]
        assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before["workers"]]
        assert after["hub"]["pid"] == before["hub"]["pid"]
        assert "reload refused" in d.log() and "broken on purpose" in d.log()
        assert_no_gap(replay_of(first, b"tick") + replay_of(first, b"tick"))
    finally:
        d.close()


def test_a_hub_refuses_state_it_does_not_know(installed):
    """The hub's own pre-flight: new code that cannot adopt the sessions is not run."""
    d = ready(ListeningDaemon(workers=1, env={"PYTHONPATH": str(installed)}))
    try:
        replay_of(attach(d, "a", command=COUNTER), b"tick 1")
        hub = installed / "cmuxd" / "hub.py"
        hub.write_text(hub.read_text().replace("STATE_VERSION = 1", "STATE_VERSION = 2"))
        hub_pid = d.status()["hub"]["pid"]
        out = d.cli("hub", "upgrade", "--state-dir", str(d.state_dir))
        assert out.returncode == 0, out.stderr
        wait_for(lambda: d.status()["hub"]["upgrades_refused"] == 1, timeout=20)
        assert d.status()["hub"]["pid"] == hub_pid
        assert "upgrade refused" in d.log()
        assert d.authed().call("pty.list")["result"]["sessions"][0]["session_id"] == "counter"
    finally:
        d.close()


def test_stop_and_start_on_the_same_state_dir_keeps_sessions(installed):
    d = ready(ListeningDaemon(workers=1, env={"PYTHONPATH": str(installed)}))
    try:
        out = replay_of(attach(d, "a", command=COUNTER), b"tick 2")
        pid = int(re.search(rb"pid=(\d+)", out).group(1))
        for n in range(3):
            assert d.stop() == 0
            set_version(installed, f"9.9.{n}")
            d.proc = subprocess.Popen(d.proc.args, stdin=subprocess.DEVNULL,
                                      stdout=d.stderr_file, stderr=d.stderr_file, env=d.env,
                                      cwd="/")
            d.wait_ready()
            # The new daemon asks the hub it adopted to upgrade to its own code.
            wait_for(lambda: d.status()["hub"]["version"] == f"9.9.{n}", timeout=20)
            wait_for(lambda: d.status()["hub"]["sessions"] == 1, timeout=15)
        again = attach(d, "b", require_existing=True)
        out = replay_of(again, b"tick") + replay_of(again, b"tick")
        assert f"pid={pid}".encode() in out
        assert_no_gap(out)
        assert "adopted the PTY hub" in d.log()
        assert d.status()["version"] == "9.9.2"
    finally:
        stop_process(d.proc)
        d.close()


def handshake_started(d):
    """A TCP connection that has its challenge and has not answered yet, with its nonce."""
    sock = d.tcp_connect()
    return sock, d.challenge(sock)["nonce"]


def test_a_handshake_in_flight_is_finished_before_the_supervisor_re_executes(installed):
    d = ready(ListeningDaemon(workers=1, env={"PYTHONPATH": str(installed)}))
    try:
        sock, nonce = handshake_started(d)
        set_version(installed, "9.9.9")
        d.proc.send_signal(1)
        # Accepting has stopped and the exec waits for this handshake to end.
        wait_for(lambda: "re-executes itself in place" in d.log(), timeout=20)
        sock.sendall(orjson.dumps({"mac": mac_for(d.token, RELAY_ID, nonce),
                                   "relay_id": RELAY_ID}) + b"\n")
        assert json.loads(read_line(sock)) == {"ok": True}
        stream = FrameStream(sock)
        assert stream.call("ping", id=1)["ok"]
        wait_for(lambda: d.status()["version"] == "9.9.9", timeout=20)
        assert d.status()["pid"] == d.proc.pid
        assert stream.call("ping", id=2)["ok"]  # its worker was adopted, not replaced
    finally:
        d.close()


def test_a_rotated_token_and_its_grace_cross_the_re_exec(installed):
    d = ready(ListeningDaemon(workers=1, env={"PYTHONPATH": str(installed)}))
    try:
        old = d.token
        assert d.authed().call("ping", id=1)["ok"]
        rotated = d.cli("token", "rotate", "--grace", "600", "--state-dir", str(d.state_dir))
        assert rotated.returncode == 0, rotated.stderr
        new = d.token_file.read_text().strip()
        until = d.status()["previous_token_until"]
        set_version(installed, "9.9.9")
        d.proc.send_signal(1)
        wait_for(lambda: d.status()["version"] == "9.9.9", timeout=20)
        status = d.status()
        assert status["pid"] == d.proc.pid
        assert status["previous_token_until"] == until
        assert status["counters"]["accepted"] >= 1  # the counters went on, not from zero
        for token in (new, old):
            d.token = token
            assert d.authed().call("ping", id=1)["ok"]
        proc = psutil.Process(d.proc.pid)
        seen = " ".join(proc.cmdline()) + repr(proc.environ()) + d.log()
        assert old not in seen and new not in seen
    finally:
        d.close()


def test_a_supervisor_that_fails_after_exec_leaves_the_sessions_to_the_next_start(installed):
    """The new image fails before it serves (the pre-flight cannot catch everything): the
    process ends, its workers see their channel close and stop, and the hub keeps the
    sessions for the next start, which adopts them."""
    d = ready(ListeningDaemon(workers=1, env={"PYTHONPATH": str(installed)}))
    try:
        out = replay_of(attach(d, "a", command=COUNTER), b"tick 2")
        pid = int(re.search(rb"pid=(\d+)", out).group(1))
        init = installed / "cmuxd" / "supervisor" / "__init__.py"
        good = init.read_text()
        init.write_text(good.replace('    row = state["creds"]\n',
                                     '    raise RuntimeError("broken on purpose")\n'))
        set_version(installed, "9.9.9")
        d.proc.send_signal(1)
        assert d.proc.wait(timeout=30) != 0
        assert "broken on purpose" in d.log()
        init.write_text(good)
        d.proc = subprocess.Popen(d.proc.args, stdin=subprocess.DEVNULL, stdout=d.stderr_file,
                                  stderr=d.stderr_file, env=d.env, cwd="/")
        ready(d)
        wait_for(lambda: d.status()["hub"]["sessions"] == 1, timeout=15)
        again = attach(d, "b", require_existing=True)
        out = replay_of(again, b"tick") + replay_of(again, b"tick")
        assert f"pid={pid}".encode() in out
        assert_no_gap(out)
    finally:
        stop_process(d.proc)
        d.close()
