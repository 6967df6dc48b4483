"""`attach` across a dropped connection, on a real terminal: the worker holding it killed, the
daemon stopped, the path cut in a network namespace, the ssh carrying it killed. The session
counts lines, so the screen can be compared byte for byte with what the session wrote:
nothing twice, nothing missing but a gap that is reported."""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest

from attach_terminal import (
    CLEARED,
    COUNTER,
    DETACH,
    EVERY_LINE,
    SHELL,
    STATUS,
    attach,
    last_line,
    reachable,
    reconnecting,
    worker_of,
)
from helpers import daemon_command, wait_for
from listening import ListeningDaemon, free_port
from netns import PeerNamespace, ip, namespace_or_skip
from terminal import Terminal
from test_ssh_transport import REMOTE, sshd  # noqa: F401 (a fixture)


def screen(out: bytes) -> bytes:
    """What the session wrote, as the terminal showed it: status lines and the attach's
    own last line taken out (the terminal was cooked again by then: \\n became \\r\\n)."""
    shown = STATUS.sub(b"", out)
    if b"\r\n[detached: " in shown:
        shown = shown[:shown.rindex(b"\r\n[detached: ")].rstrip(b"\r")
    return shown


def daemon_pids(d: ListeningDaemon) -> list[int]:
    """The supervisor and its workers (not the PTY hub: sessions go on producing)."""
    return [d.proc.pid] + [w["pid"] for w in d.status()["workers"]]


def detach(term: Terminal) -> None:
    term.write(DETACH)
    assert term.wait() == 0
    assert b"[detached: session s]" in term.out


def test_attach_continues_after_the_worker_holding_it_is_killed(spawn_listening):
    d = spawn_listening(workers=2)
    term = attach(d, "127.0.0.1", COUNTER)
    try:
        term.read_until(b"line-20\r\n")
        os.kill(worker_of(d, term.pid), signal.SIGKILL)
        term.read_until(b"line-%d\r\n" % (last_line(term.out) + 100))
        detach(term)
        shown = screen(term.out)
        assert shown == EVERY_LINE[:len(shown)]  # from line-1 on: no duplicate, no gap
    finally:
        term.close()


# --- the daemon stopped (SIGSTOP): the link goes silent -----------------------------------------


@pytest.fixture
def stopped():
    """stop(pids) SIGSTOPs them; whatever is still stopped is continued at the end."""
    held: list[int] = []

    def stop(pids: list[int]) -> None:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            held.append(pid)

    def cont() -> None:
        while held:
            os.kill(held.pop(), signal.SIGCONT)

    stop.cont = cont
    yield stop
    cont()


def test_keys_typed_while_reconnecting_reach_the_session_once(spawn_listening, stopped,
                                                             tmp_path):
    d = spawn_listening(workers=1)
    typed = tmp_path / "typed"
    term = attach(d, "127.0.0.1", SHELL)
    try:
        term.read_until(b"sh> ")
        stopped(daemon_pids(d))
        term.read_until(reconnecting(1), timeout=15)
        term.write(f"echo held >> {typed}\r".encode())
        stopped.cont()
        wait_for(lambda: typed.exists(), timeout=15, message="the held keys to run")
        term.write(b"echo after\r")
        term.read_until(b"after\r\n")
        detach(term)
        assert typed.read_text() == "held\n"
        assert b"may or may not" not in term.out
    finally:
        term.close()


def test_ctrl_right_bracket_detaches_while_reconnecting(spawn_listening, stopped):
    d = spawn_listening(workers=1)
    term = attach(d, "127.0.0.1", COUNTER)
    try:
        term.read_until(b"line-5\r\n")
        stopped(daemon_pids(d))
        term.read_until(reconnecting(1), timeout=15)
        detach(term)
        stopped.cont()
        s = d.authed()  # the session runs on, unattached

        def unattached():
            """The client left while the daemon was stopped: seen once it runs again."""
            sessions = s.call("pty.list")["result"]["sessions"]
            return sessions if [e["attachments"] for e in sessions] == [[]] else None

        [entry] = wait_for(unattached, message="the detach")
        assert entry["session_id"] == "s"
        s.close()
    finally:
        term.close()


# --- while the client is away: a gap, a session ended or replaced ---------------------------------


def away(d: ListeningDaemon, term: Terminal):
    """Stop the attach and kill its worker: the client is gone until SIGCONT."""
    worker = worker_of(d, term.pid)
    os.kill(term.pid, signal.SIGSTOP)
    os.kill(worker, signal.SIGKILL)


def test_a_gap_larger_than_the_scrollback_is_reported(spawn_listening, tmp_path):
    go, done = tmp_path / "go", tmp_path / "done"
    burst = (f"i=0; while [ ! -e {go} ]; do i=$((i+1)); echo line-$i; sleep 0.02; done; "
             f"end=$((i+5000)); while [ $i -lt $end ]; do i=$((i+1)); echo line-$i; done; "
             f"touch {done}; {COUNTER.replace('i=0; ', '')}")
    d = spawn_listening("--scrollback", "4096", workers=2)
    term = attach(d, "127.0.0.1", burst)
    try:
        term.read_until(b"line-10\r\n")
        before = last_line(term.out)
        away(d, term)
        go.touch()
        wait_for(done.exists, timeout=30, message="the burst of 5,000 lines")
        os.kill(term.pid, signal.SIGCONT)
        term.read_until(b"of output were lost while disconnected")
        term.read_until(b"line-%d\r\n" % (before + 5000 + 20))  # past the burst
        detach(term)
        shown = screen(term.out)
        [(notice, gap)] = re.findall(
            rb"(\r\n\[127\.0\.0\.1: (\d+) bytes of output were lost while disconnected, more "
            rb"than the daemon's scrollback holds\]\r\n)", shown)
        before, after = shown.split(notice)
        assert before == EVERY_LINE[:len(before)]
        resumed = len(before) + int(gap)
        assert after == EVERY_LINE[resumed:resumed + len(after)]
        assert int(gap) > 5000 * len(b"line-10\r\n") - 4096
    finally:
        term.close()


@pytest.mark.parametrize("replaced", [False, True], ids=["ended", "replaced"])
def test_a_session_ended_or_replaced_while_away_is_reported_not_joined(spawn_listening,
                                                                       replaced):
    d = spawn_listening(workers=2)
    term = attach(d, "127.0.0.1", COUNTER)
    try:
        term.read_until(b"line-5\r\n")
        away(d, term)
        s = d.authed()
        assert s.call("pty.close", {"session_id": "s"})["ok"]
        if replaced:
            ident = {"session_id": "s", "attachment_id": "other", "client_attachment_token": "t"}
            assert s.call("pty.attach", dict(ident, cols=80, rows=24,
                                             command="exec sleep 60"))["ok"]
            assert s.call("pty.detach", ident)["ok"]
        os.kill(term.pid, signal.SIGCONT)
        assert term.wait() == 1
        if replaced:
            assert (b"[replaced by a new session of the same name while disconnected; "
                    b"attach again to join the new one: session s]") in term.out
            [entry] = s.call("pty.list")["result"]["sessions"]
            assert entry["attachments"] == []  # looked at, never joined
        else:
            assert b"[ended while disconnected; its exit status is not known: session s]" \
                in term.out
        s.close()
    finally:
        term.close()


# --- the path cut: a daemon in a network namespace, reached over a veth -------------------------


@pytest.fixture
def far_daemon():
    """A daemon in a namespace of its own, listening on the far end of a veth."""
    tag = str(os.getpid() % 100000 + 3)
    with namespace_or_skip(f"cmuxd-peer-{tag}-probe",
                           lambda: PeerNamespace(tag, subnet=216)) as ns:
        port = free_port()
        d = ListeningDaemon(workers=1, tcp=[f"{ns.peer_address}:{port}"],
                            wrap=["ip", "netns", "exec", ns.name])
        try:
            d.port = port
            d.wait_ready()
            wait_for(lambda: reachable(ns.peer_address, port),
                     message=f"the daemon to answer on {ns.peer_address}:{port}:\n{d.log()}")
            yield ns, d
        finally:
            d.close()


def test_attach_continues_when_the_path_comes_back(far_daemon):
    ns, d = far_daemon
    term = attach(d, ns.peer_address, COUNTER)
    try:
        term.read_until(b"line-20\r\n")
        ip("link", "set", ns.link, "down")
        term.read_until(reconnecting(2), timeout=15)
        cut_at = last_line(term.out)
        ip("link", "set", ns.link, "up")
        back = time.monotonic()
        term.read_until(CLEARED, timeout=10)
        took = time.monotonic() - back
        term.read_until(b"line-%d\r\n" % (cut_at + 100))
        detach(term)
        shown = screen(term.out)
        assert shown == EVERY_LINE[:len(shown)]
        print(f"\nreattached {took * 1000:.0f} ms after the path came back")
        assert took < 5  # generous: the back-off is capped at 1 s
    finally:
        term.close()


def test_an_enter_sent_as_the_path_drops_runs_at_most_once(far_daemon, tmp_path):
    ns, d = far_daemon
    ran = tmp_path / "ran"
    term = attach(d, ns.peer_address, SHELL)
    try:
        term.read_until(b"sh> ")
        ip("link", "set", ns.link, "down")
        term.write(f"echo ran >> {ran}\r".encode())  # sent, never acknowledged
        term.read_until(reconnecting(1), timeout=15)
        term.write(f"echo blind >> {ran}\r".encode())  # typed on top of input in doubt
        ip("link", "set", ns.link, "up")
        term.read_until(b"was dropped; check the screen and type it again]")
        assert re.search(rb"\[10\.216\.\d+\.2: input typed just before the link dropped "
                         rb"\(\d+ bytes\) may or may not have reached the session and was not "
                         rb"sent again; input typed while reconnecting \(\d+ bytes\) was "
                         rb"dropped; check the screen and type it again\]", term.out)
        term.write(f"echo again >> {ran}\r".encode())
        wait_for(ran.exists, message="the command typed after the reattach to run")
        detach(term)
        assert ran.read_text() == "again\n"
    finally:
        term.close()


# --- over ssh: every reconnect is a new ssh --------------------------------------------------------


def test_attach_over_ssh_reconnects_with_a_new_ssh(sshd, spawn_listening):
    server, env = sshd
    d = spawn_listening(workers=1)
    # The far side's sessions live in its daemon; ssh reaches them through `connect --stdio`
    # (the `#` makes the `serve --stdio` the client appends a comment).
    bridge = f"{REMOTE} connect unix://{d.socket_path} --stdio #"
    term = Terminal(daemon_command("attach", f"ssh://127.0.0.1:{server.port}", "s",
                                   "--remote-command", bridge, "--command", COUNTER), env)
    try:
        term.read_until(b"line-20\r\n")
        [first] = psutil.Process(term.pid).children()
        first.kill()
        second = wait_for(lambda: next((p for p in psutil.Process(term.pid).children()
                                        if p.pid != first.pid), None))
        assert "BatchMode=yes" in second.cmdline()  # the terminal is raw: ssh must not ask
        term.read_until(b"line-%d\r\n" % (last_line(term.out) + 100))
        detach(term)
        shown = screen(term.out)
        assert shown == EVERY_LINE[:len(shown)]
    finally:
        term.close()
