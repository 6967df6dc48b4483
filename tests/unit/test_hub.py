"""The PTY hub on its own: real PTYs, real shells, in one asyncio loop.

A `Peer` here is a small real implementation of what a connection does for the hub: a
bounded outbound queue per attachment (256 frames, overflow refused), drained into a list
and reported back with `hub.drained`, or left undrained to play a client that stopped
reading.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
from collections import deque

import pytest

from cmuxd.hub import Hub
from cmuxd.protocol import RPCError

TIMEOUT = 30.0
QUEUE_FRAMES = 256


class Peer:
    def __init__(self, hub: Hub, draining: bool = True, lag: float = 0.0):
        self.hub = hub
        self.draining = draining
        self.lag = lag
        self.id = hub.add_peer(self.deliver)
        self.queues: dict[tuple, deque] = {}
        self.received: list[dict] = []
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._drain()) if draining else None

    def deliver(self, event: dict) -> bool:
        key = (event["session_id"], event["attachment_id"], event["attachment_token"])
        queue = self.queues.setdefault(key, deque())
        if event["event"] != "pty.exit" and len(queue) >= QUEUE_FRAMES:
            return False
        queue.append(event)
        self._wake.set()
        return True

    async def _drain(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            for key, queue in list(self.queues.items()):
                sent = 0
                while queue:
                    self.received.append(queue.popleft())
                    sent += 1
                if sent:
                    self.hub.drained(self.id, *key, sent)
            # Let the PTY reader run between batches, like a socket would.
            await asyncio.sleep(self.lag)

    def pending(self) -> list[dict]:
        return [e for q in self.queues.values() for e in q]

    def events(self, aid: str | None = None, token: str | None = None) -> list[dict]:
        frames = self.received if self.draining else self.pending() + self.received
        return [e for e in frames
                if (aid is None or e["attachment_id"] == aid)
                and (token is None or e["attachment_token"] == token)]

    def output(self, aid: str, token: str | None = None) -> bytes:
        return b"".join(base64.b64decode(e["data_base64"])
                        for e in self.events(aid, token) if e["event"] == "pty.data")

    def names(self, aid: str, token: str | None = None) -> list[str]:
        return [e["event"] for e in self.events(aid, token)]

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def until(predicate, what: str, timeout: float = TIMEOUT):
    """Wait for a condition the loop will bring about; fail after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def run(test, **hub_args):
    """Run `test(hub)` in a fresh loop; the hub is always shut down afterwards."""

    async def main():
        hub = Hub(**hub_args)
        try:
            await asyncio.wait_for(test(hub), TIMEOUT * 3)
        finally:
            await hub.shutdown()

    asyncio.run(main())


async def attach(hub, peer, sid="s", aid="a", token="tok", cols=80, rows=24, command="",
                 require_existing=False, seq_ack=False):
    return await hub.attach(peer.id, sid, aid, token, cols, rows, command, require_existing,
                            seq_ack)


def session_of(hub, sid):
    for entry in hub.list()["sessions"]:
        if entry["session_id"] == sid:
            return entry
    return None


# --- scrollback and replay ---------------------------------------------------------------


def test_replay_then_live_has_no_gap_or_overlap_at_the_seam():
    async def test(hub):
        a = Peer(hub)
        b = Peer(hub)
        # ~2.1 MB of numbered lines, more than the 1 MiB ring, then wait for input.
        await attach(hub, a, aid="a1", command="seq 1 300000; exec cat")
        await until(lambda: len(a.output("a1")) > 1_200_000, "output past the ring size")
        result = await attach(hub, b, aid="b1", token="tok-b")
        assert result["replay_bytes"] == 1 << 20
        await until(lambda: a.output("a1").endswith(b"300000\r\n")
                    and b.output("b1").endswith(b"300000\r\n"), "the last line on both")
        full = a.output("a1")
        assert full == b"".join(b"%d\r\n" % i for i in range(1, 300001))
        seen = b.output("b1")
        assert full.endswith(seen)
        events = b.events("b1")
        assert events[0]["event"] == "pty.ready"
        replay = events[1 : 1 + -(-result["replay_bytes"] // 49152)]
        assert all(e["event"] == "pty.data" for e in replay)
        assert all(len(base64.b64decode(e["data_base64"])) <= 49152 for e in replay)
        assert sum(len(base64.b64decode(e["data_base64"])) for e in replay) == 1 << 20
        assert session_of(hub, "s")["scrollback_bytes"] == 1 << 20

    run(test)


def test_scrollback_limit_is_configurable():
    async def test(hub):
        a = Peer(hub)
        await attach(hub, a, command="seq 1 2000; exec cat")
        await until(lambda: a.output("a").endswith(b"2000\r\n"), "all lines")
        b = Peer(hub)
        result = await attach(hub, b, aid="b", token="t2")
        assert result["replay_bytes"] == 4096
        await until(lambda: b.output("b"), "the replay")
        assert b.output("b") == a.output("a")[-4096:]

    run(test, scrollback=4096)


def test_live_reads_are_at_most_32_kib():
    async def test(hub):
        a = Peer(hub)
        await attach(hub, a, command="stty -opost; head -c 3000000 /dev/zero | tr '\\0' z")
        await until(lambda: "pty.exit" in a.names("a"), "the end of the session")
        sizes = [len(base64.b64decode(e["data_base64"])) for e in a.events("a")
                 if e["event"] == "pty.data"]
        assert sum(sizes) == 3000000
        assert max(sizes) <= 32768

    run(test)


# --- input --------------------------------------------------------------------------------


def test_input_queue_accepts_whole_writes_or_nothing():
    async def test(hub):
        a = Peer(hub)
        # The process never reads, so the queue can only grow.
        await attach(hub, a, command="exec sleep 1000")
        too_big = b"x" * (16384 * 256 + 1)
        with pytest.raises(RPCError) as err:
            hub.write(a.id, "s", "a", "tok", too_big, None, False)
        assert (err.value.code, err.value.message) == ("pty_input_queue_full", "PTY input queue is full")
        # Nothing of the rejected write was queued: a write of exactly 256 chunks fits.
        assert hub.write(a.id, "s", "a", "tok", b"y" * (16384 * 256), None, False) == {"written": 16384 * 256}
        with pytest.raises(RPCError) as err:
            hub.write(a.id, "s", "a", "tok", b"z", None, False)
        assert err.value.code == "pty_input_queue_full"
        # Request form: still attached.
        assert session_of(hub, "s")["attachments"][0]["attachment_id"] == "a"
        # Notification form: its pty.error, then detached with pty.exit as the last event.
        assert hub.write(a.id, "s", "a", "tok", b"z", None, True) == {"written": 0}
        await until(lambda: a.names("a")[-2:] == ["pty.error", "pty.exit"], "pty.exit")
        assert a.events("a")[-2]["code"] == "pty_input_queue_full"
        assert session_of(hub, "s")["attachments"] == []

    run(test)


def test_seq_rules_and_cumulative_acks():
    async def test(hub):
        a = Peer(hub)
        await attach(hub, a, command="exec cat", seq_ack=True)
        assert hub.write(a.id, "s", "a", "tok", b"x", 1, False) == {"written": 1}
        await until(lambda: [e.get("seq") for e in a.events("a") if e["event"] == "pty.input_ack"] == [1], "ack 1")
        with pytest.raises(RPCError) as err:
            hub.write(a.id, "s", "a", "tok", b"x", 3, False)
        assert (err.value.code, err.value.message) == ("pty_input_seq_gap", "PTY input sequence gap: got 3, want 2")
        with pytest.raises(RPCError) as err:
            hub.write(a.id, "s", "a", "tok", b"x", 0, False)
        assert err.value.message == "PTY input sequence gap: got 0, want 2"
        # Unsequenced writes are not checked and do not advance the expected value.
        hub.write(a.id, "s", "a", "tok", b"u", None, False)
        # An empty sequenced write is checked, advances, and is acknowledged.
        assert hub.write(a.id, "s", "a", "tok", b"", 2, False) == {"written": 0}
        for seq in range(3, 13):
            hub.write(a.id, "s", "a", "tok", b"y" * 100, seq, False)
        await until(lambda: any(e.get("seq") == 12 for e in a.events("a")), "ack 12")
        acks = [e["seq"] for e in a.events("a") if e["event"] == "pty.input_ack"]
        assert acks == sorted(acks) and acks[0] == 1 and acks[-1] == 12
        # A sequence gap sent as a notification is a pty.error, then a detach.
        assert hub.write(a.id, "s", "a", "tok", b"x", 99, True) == {"written": 0}
        await until(lambda: a.names("a")[-2:] == ["pty.error", "pty.exit"], "pty.exit")
        assert a.events("a")[-2]["message"] == "PTY input sequence gap: got 99, want 13"

    run(test)


def test_no_acks_without_input_seq_ack():
    async def test(hub):
        a = Peer(hub)
        await attach(hub, a, command="exec cat")
        hub.write(a.id, "s", "a", "tok", b"ping\n", 1, False)
        await until(lambda: a.output("a").count(b"ping") >= 2, "the echo and the copy")
        assert "pty.input_ack" not in a.names("a")

    run(test)


def test_superseding_attachment_replaces_the_old_one():
    async def test(hub):
        a, b = Peer(hub), Peer(hub)
        await attach(hub, a, aid="x", token="old", command="exec cat", seq_ack=True)
        hub.write(a.id, "s", "x", "old", b"first\n", 1, False)
        await attach(hub, b, aid="x", token="new", seq_ack=True)
        await until(lambda: a.names("x", "old")[-1:] == ["pty.exit"], "pty.exit for the old one")
        with pytest.raises(RPCError) as err:
            hub.write(a.id, "s", "x", "old", b"nope", None, False)
        assert (err.value.code, err.value.message) == ("not_found", "PTY attachment not found")
        # The new attachment starts again at seq 1, and its input follows the old input.
        hub.write(b.id, "s", "x", "new", b"second\n", 1, False)
        await until(lambda: b.output("x", "new").count(b"second") >= 2, "the echo and the copy")
        out = b.output("x", "new")
        assert out.index(b"first") < out.index(b"second")
        assert [e["attachment_id"] for e in session_of(hub, "s")["attachments"]] == ["x"]
        assert b.names("x", "new")[0] == "pty.ready"

    run(test)


def test_tokens_must_match():
    async def test(hub):
        a = Peer(hub)
        await attach(hub, a, command="exec cat")
        for call in (
            lambda: hub.write(a.id, "s", "a", "TOK", b"x", None, False),
            lambda: hub.resize(a.id, "s", "a", "tok2", 10, 10),
            lambda: hub.detach(a.id, "s", "a", ""),
            lambda: hub.detach(a.id, "s", "zz", "tok"),
            lambda: hub.detach(a.id, "zz", "a", "tok"),
        ):
            with pytest.raises(RPCError) as err:
                call()
            assert (err.value.code, err.value.message) == ("not_found", "PTY attachment not found")

    run(test)


# --- size ---------------------------------------------------------------------------------


STTY_LOOP = "while read line; do stty size; done"


def test_min_size_reaches_the_pty():
    async def test(hub):
        a, b = Peer(hub), Peer(hub)

        async def size_seen(marker: int) -> bytes:
            # Each query prints `rows cols`; the marker line tells queries apart.
            hub.write(a.id, "s", "a1", "t1", b"%d\n" % marker, None, False)
            await until(lambda: a.output("a1").count(b"\r\n") >= 2 * marker, f"stty reply {marker}")
            return a.output("a1").split(b"\r\n")[2 * marker - 1]

        await attach(hub, a, aid="a1", token="t1", cols=120, rows=40, command=STTY_LOOP)
        assert await size_seen(1) == b"40 120"
        await attach(hub, b, aid="b1", token="t2", cols=90, rows=50, require_existing=True)
        assert await size_seen(2) == b"40 90"
        hub.resize(a.id, "s", "a1", "t1", 70, 60)
        assert await size_seen(3) == b"50 70"
        hub.detach(b.id, "s", "b1", "t2")
        assert await size_seen(4) == b"60 70"
        hub.resize(a.id, "s", "a1", "t1", 100000, 100000)
        assert await size_seen(5) == b"65535 65535"
        entry = session_of(hub, "s")
        assert entry["attachments"] == [{"attachment_id": "a1", "cols": 65535, "rows": 65535, "persistent": True}]
        hub.detach(a.id, "s", "a1", "t1")
        entry = session_of(hub, "s")
        assert entry["attachments"] == []
        assert (entry["effective_cols"], entry["effective_rows"]) == (65535, 65535)
        assert (entry["last_known_cols"], entry["last_known_rows"]) == (65535, 65535)

    run(test)


# --- output volume and flow control ---------------------------------------------------------


def _payload(path, size: int) -> bytes:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def test_twenty_mib_reach_two_attachments_complete(tmp_path):
    data = _payload(tmp_path / "blob", 20 << 20)

    async def test(hub):
        # `b` reads in bursts, far slower than the PTY produces: without flow control its
        # queue would overflow and it would be dropped.
        a, b = Peer(hub), Peer(hub, lag=0.05)
        command = f"stty raw -echo; printf R; read go; cat {tmp_path / 'blob'}"
        await attach(hub, a, aid="a", command=command)
        await until(lambda: a.output("a") == b"R", "the prompt")
        await attach(hub, b, aid="b", token="t2")
        hub.write(a.id, "s", "a", "tok", b"go\n", None, False)
        await until(lambda: a.names("a")[-1:] == ["pty.exit"] and b.names("b", "t2")[-1:] == ["pty.exit"],
                    "the end of the session on both", timeout=120)
        assert a.output("a") == b"R" + data
        assert b.output("b", "t2") == b"R" + data

    run(test)


def test_a_peer_that_stops_draining_does_not_stall_the_others(tmp_path):
    # More than 256 events of up to 32 KiB (READ_MAX): enough to overflow the stuck queue.
    data = _payload(tmp_path / "blob", 16 << 20)

    async def test(hub):
        hub.stall_timeout = 0.5
        a = Peer(hub)
        stuck = Peer(hub, draining=False)
        command = f"stty raw -echo; printf R; read go; cat {tmp_path / 'blob'}; exec sleep 1000"
        await attach(hub, a, aid="a", command=command)
        await until(lambda: a.output("a") == b"R", "the prompt")
        await attach(hub, stuck, aid="stuck", token="t2")
        hub.write(a.id, "s", "a", "tok", b"go\n", None, False)
        await until(lambda: len(a.output("a")) == 1 + len(data), "all output on the draining peer",
                    timeout=120)
        assert a.output("a") == b"R" + data
        # The stuck attachment was dropped: its queue holds 256 frames, then pty.exit.
        names = stuck.names("stuck", "t2")
        assert names[-1] == "pty.exit" and len(names) == QUEUE_FRAMES + 1
        assert [e["attachment_id"] for e in session_of(hub, "s")["attachments"]] == ["a"]

    run(test)


def test_a_lone_slow_peer_blocks_the_process_instead_of_being_dropped(tmp_path):
    # More than 128 events (BEHIND_FRAMES) of up to 32 KiB: enough to be held back.
    data = _payload(tmp_path / "blob", 8 << 20)

    async def test(hub):
        hub.stall_timeout = 0.05
        a = Peer(hub, draining=False)
        await attach(hub, a, command=f"stty raw -echo; cat {tmp_path / 'blob'}; exec sleep 1000")
        session = hub.sessions["s"]
        await until(lambda: session.pump.stall_timer is not None, "the PTY to be held back")
        first = session.pump.stall_timer
        # The stall timeout passed with nobody else waiting: the timer is simply renewed.
        await until(lambda: session.pump.stall_timer is not first, "the stall timer to fire")
        assert "pty.exit" not in a.names("a")
        assert len(a.pending()) < QUEUE_FRAMES
        a.draining = True
        a._task = asyncio.get_running_loop().create_task(a._drain())
        a._wake.set()
        await until(lambda: len(a.output("a")) == len(data), "all output once it reads again")
        assert a.output("a") == data
        assert "pty.exit" not in a.names("a")

    run(test)


# --- lifetime -----------------------------------------------------------------------------


def test_process_exit_delivers_output_then_exit():
    async def test(hub):
        a = Peer(hub)
        await attach(hub, a, command="printf 'bye now'")
        await until(lambda: a.names("a")[-1:] == ["pty.exit"], "pty.exit")
        assert a.output("a") == b"bye now"
        assert a.names("a")[0] == "pty.ready"
        assert hub.list() == {"sessions": []}
        with pytest.raises(RPCError) as err:
            hub.close("s")
        assert (err.value.code, err.value.message) == ("not_found", "PTY session not found")
        # The same name now starts a new process.
        await attach(hub, a, command="printf again")
        await until(lambda: a.output("a").endswith(b"again"), "the second process")

    run(test)


def test_close_kills_and_ends_every_attachment():
    async def test(hub):
        a, b = Peer(hub), Peer(hub)
        await attach(hub, a, aid="a", command="trap '' HUP TERM; echo $$; exec sleep 1000")
        await attach(hub, b, aid="b", token="t2")
        await until(lambda: b"\r\n" in a.output("a"), "the pid")
        pid = int(a.output("a").split(b"\r\n")[0])
        assert hub.close("s") == {"session_id": "s", "closed": True}
        await until(lambda: a.names("a")[-1:] == ["pty.exit"] and b.names("b", "t2")[-1:] == ["pty.exit"],
                    "pty.exit on both")
        await until(lambda: not _alive(pid), "the process to be gone")
        with pytest.raises(RPCError):
            hub.close("s")

    run(test)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_require_existing_never_starts_a_process():
    async def test(hub):
        a = Peer(hub)
        with pytest.raises(RPCError) as err:
            await attach(hub, a, sid="t1", require_existing=True)
        assert err.value.code == "pty_session_not_found"
        assert err.value.message == 'persistent PTY session "t1" is not running'
        assert hub.list() == {"sessions": []}

    run(test)


def test_idle_ttl_kills_a_session_nobody_is_attached_to():
    async def test(hub):
        a = Peer(hub)
        await attach(hub, a, command="exec cat")
        hub.detach(a.id, "s", "a", "tok")
        await until(lambda: hub.list() == {"sessions": []}, "the idle session to be killed")

    run(test, idle_ttl=0.2)


def test_attaching_cancels_the_idle_timer():
    async def test(hub):
        a = Peer(hub)
        await attach(hub, a, command="exec cat")
        hub.detach(a.id, "s", "a", "tok")
        assert hub.sessions["s"].idle_timer is not None
        await attach(hub, a, aid="again", require_existing=True)
        assert hub.sessions["s"].idle_timer is None

    run(test, idle_ttl=3600)


def test_remove_peer_detaches_but_keeps_the_session():
    async def test(hub):
        a, b = Peer(hub), Peer(hub)
        await attach(hub, a, aid="a", command="exec cat")
        await attach(hub, b, aid="b", token="t2", cols=60)
        await hub.remove_peer(b.id)
        entry = session_of(hub, "s")
        assert [x["attachment_id"] for x in entry["attachments"]] == ["a"]
        assert entry["effective_cols"] == 80
        await hub.remove_peer(a.id)
        entry = session_of(hub, "s")
        assert entry["attachments"] == [] and hub.sessions["s"].idle_timer is not None

    run(test)


def test_shutdown_hangs_up_then_kills():
    async def test(hub):
        a = Peer(hub)
        await attach(hub, a, sid="polite", aid="a", command="echo $$; exec sleep 1000")
        await attach(hub, a, sid="stubborn", aid="b", command="trap '' HUP; echo $$; while :; do sleep 1; done")
        await until(lambda: b"\r\n" in a.output("a") and b"\r\n" in a.output("b"), "both pids")
        pids = [int(a.output(x).split(b"\r\n")[0]) for x in ("a", "b")]
        await hub.shutdown()
        assert hub.list() == {"sessions": []}
        assert not any(_alive(pid) for pid in pids)
        await until(lambda: a.names("a")[-1] == "pty.exit" and a.names("b")[-1] == "pty.exit",
                    "pty.exit on both")
        with pytest.raises(RPCError) as err:
            await attach(hub, a, sid="late")
        assert err.value.code == "remote_connection_inactive"

    run(test)


# --- process launch -----------------------------------------------------------------------


ENV_PROBE = 'printf "%s|%s|%s|%s|%s|%s|%s" "$TERM" "$COLORTERM" "$TERM_PROGRAM" "$SHELL" "$LC_ALL" "$LC_CTYPE" "$LANG"'


def _probe_env(monkeypatch, **env) -> list[str]:
    for key in ("TERM", "COLORTERM", "TERM_PROGRAM", "SHELL", "LC_ALL", "LC_CTYPE", "LANG"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    found = []

    async def test(hub):
        a = Peer(hub)
        await attach(hub, a, command=ENV_PROBE)
        await until(lambda: a.names("a")[-1:] == ["pty.exit"], "the probe to finish")
        found.extend(a.output("a").decode().split("|"))

    run(test, shell="/bin/sh")
    return found


def test_environment_defaults(monkeypatch):
    assert _probe_env(monkeypatch, TERM="dumb", LANG="en_US.ISO-8859-1") == [
        "xterm-256color", "truecolor", "ghostty", "/bin/sh", "C.UTF-8", "C.UTF-8", "C.UTF-8"]


def test_environment_keeps_what_the_daemon_has(monkeypatch):
    assert _probe_env(monkeypatch, COLORTERM="24bit", TERM_PROGRAM="x", SHELL="/bin/zsh",
                      LC_CTYPE="de_DE.utf8", LANG="C") == [
        "xterm-256color", "24bit", "x", "/bin/zsh", "", "de_DE.utf8", "C"]


def test_no_locale_at_all_means_c_utf8(monkeypatch):
    assert _probe_env(monkeypatch)[4:] == ["C.UTF-8", "C.UTF-8", "C.UTF-8"]


def test_empty_command_starts_the_configured_shell_as_controlling_terminal_owner():
    async def test(hub):
        a = Peer(hub)
        await attach(hub, a, command="  ")
        hub.write(a.id, "s", "a", "tok", b"echo \"[$0|$(ps -o tty= -p $$)|$(ps -o sid= -p $$)|$$]\"; exit\n", None, False)
        await until(lambda: a.names("a")[-1:] == ["pty.exit"], "the shell to exit")
        # The expanded line; the tty's echo of the command (and a prompt) may come before it.
        found = re.search(rb"\[(/[^|\]]*)\|\s*([^|\]$]+?)\s*\|\s*(\d+)\|(\d+)\]", a.output("a"))
        assert found, a.output("a")
        shell, tty, sid, pid = found.groups()
        assert shell == b"/bin/sh"
        assert tty != b"?"  # ps shows the controlling terminal
        assert sid == pid  # a session leader, with the PTY as its controlling terminal

    run(test, shell="/bin/sh")


def test_start_failure_is_reported():
    async def test(hub):
        a = Peer(hub)
        with pytest.raises(RPCError) as err:
            await attach(hub, a, command="")
        assert err.value.code == "pty_start_failed"
        assert hub.list() == {"sessions": []}

    run(test, shell="/nonexistent/shell")
