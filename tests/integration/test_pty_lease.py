"""The PTY read lease across the whole daemon: a worker reading a session the hub lent it, the
hand-over when attachments change, the recovery when the lease holder dies, absolute output
offsets, bounded input, and the versioned hub link."""

from __future__ import annotations

import base64
import os
import re
import select
import signal
import socket
import threading
import time

import orjson
import psutil
import pytest

from helpers import wait_for
from listening import ListeningDaemon
from test_pty_daemon import collect, on_worker

READ_IN_FLIGHT = 64 * 1024
"""What the lease holder may have read but not yet published when it dies."""


def ident(aid: str, tok: str, session: str = "lease") -> dict:
    return {"session_id": session, "attachment_id": aid, "client_attachment_token": tok}


def attach(stream, aid: str, tok: str, session: str = "lease", **params) -> dict:
    r = stream.call("pty.attach", dict(ident(aid, tok, session), cols=80, rows=24, **params))
    assert r["ok"], r
    return r["result"]


def write(stream, aid: str, tok: str, data: bytes, session: str = "lease") -> None:
    stream.send({"method": "pty.write", "params": dict(
        ident(aid, tok, session), data_base64=base64.b64encode(data).decode())})


def data_events(stream, at_least: int, timeout: float = 20) -> list[dict]:
    """pty.data events until they hold `at_least` bytes."""
    events, n = [], 0
    deadline = time.monotonic() + timeout
    while n < at_least:
        ev = stream.next_event("pty.data", timeout=max(0.1, deadline - time.monotonic()))
        events.append(ev)
        n += len(base64.b64decode(ev["data_base64"]))
    return events


def joined(events: list[dict]) -> bytes:
    return b"".join(base64.b64decode(ev["data_base64"]) for ev in events)


def numbered(out: bytes, prefix: bytes) -> list[int]:
    """The numbers of the whole `prefix<n>` lines of a stream that may start and end mid-line."""
    lines = out.split(b"\r\n")[1:-1]
    pattern = re.compile(re.escape(prefix) + rb"(\d+)")
    return [int(m.group(1)) for m in map(pattern.fullmatch, lines) if m]


def session_names(stream) -> list[str]:
    return [s["session_id"] for s in stream.call("pty.list")["result"]["sessions"]]


# a. the lease holder dies mid-flood


def test_killing_the_lease_holder_mid_flood_loses_at_most_the_read_in_flight():
    d = ListeningDaemon(workers=2).wait_ready()
    try:
        a = d.authed()
        attach(a, "a", "ta", command="i=0; while :; do i=$((i+1)); echo L$i; done")
        collect(a, b"L5000\r\n", timeout=30)
        holder = on_worker(d, a)
        os.kill(holder, signal.SIGKILL)
        wait_for(lambda: all(w["alive"] and w["pid"] != holder for w in d.status()["workers"]),
                 timeout=15, message="a new worker")
        c = d.authed()
        result = attach(c, "c", "tc", require_existing=True)
        assert result["replay_bytes"] > 0, result
        out = joined(data_events(c, result["replay_bytes"] + 256 * 1024))
        numbers = numbered(out, b"L")
        assert len(numbers) > 1000, out[:200]
        steps = [b - a for a, b in zip(numbers, numbers[1:])]
        assert all(step >= 1 for step in steps), "a line was replayed twice"
        gaps = [(numbers[i], step) for i, step in enumerate(steps) if step > 1]
        assert len(gaps) <= 1, gaps
        for before, step in gaps:
            lost = sum(len(b"L%d\r\n" % n) for n in range(before + 1, before + step))
            assert lost <= READ_IN_FLIGHT, (before, step, lost)
        assert session_names(c) == ["lease"]
    finally:
        d.close()


# b. absolute offsets and incarnations


COUNTED = "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); echo O$i; done; exec cat"


def test_offsets_are_contiguous_and_a_resume_replays_from_the_exact_byte():
    d = ListeningDaemon(workers=2).wait_ready()
    try:
        a = d.authed()
        attach(a, "a", "ta", command=COUNTED, ext_resume_from=0)
        ready = a.next_event("pty.ready")
        assert "ext_offset" not in ready  # 0, omitted as every zero in an event (§3.4)
        incarnation = ready["ext_incarnation"]
        assert re.fullmatch(r"[0-9a-f]{32}", incarnation), incarnation
        events = []
        while b"O3000\r\n" not in joined(events[-2:]):
            events.append(a.next_event("pty.data", timeout=20))
        expect = 0
        for ev in events:
            assert ev.get("ext_offset", 0) == expect, (ev, expect)
            expect += len(base64.b64decode(ev["data_base64"]))
        full = joined(events)
        assert len(full) == expect

        b = d.authed()
        assert on_worker(d, a) != on_worker(d, b)
        middle = len(full) // 2 + 3
        result = attach(b, "b", "tb", require_existing=True, ext_resume_from=middle)
        assert result["replay_bytes"] == len(full) - middle, result
        ready = b.next_event("pty.ready")
        assert (ready["ext_incarnation"], ready["ext_offset"]) == (incarnation, middle)
        replay = data_events(b, len(full) - middle)
        assert replay[0]["ext_offset"] == middle
        assert joined(replay) == full[middle:]

        # A client that does not opt in never sees an ext_ key.
        c = d.authed()
        attach(c, "c", "tc", require_existing=True)
        plain = [c.next_event("pty.ready")] + data_events(c, 1)
        write(c, "c", "tc", b"plain\n")
        plain += [c.next_event("pty.data", where=lambda ev: b"plain" in
                               base64.b64decode(ev["data_base64"]))]
        entries = c.call("pty.list")["result"]["sessions"]
        assert not [k for x in plain + entries for k in x if k.startswith("ext_")], plain + entries
        entry, = c.call("pty.list", {"ext_incarnation": True})["result"]["sessions"]
        assert entry["ext_incarnation"] == incarnation
        assert entry["ext_offset"] >= len(full)

        # The same name after pty.close is another incarnation, counted from 0 again.
        assert c.call("pty.close", {"session_id": "lease"})["ok"]
        wait_for(lambda: session_names(c) == [], timeout=10)
        attach(c, "c2", "tc2", command="exec cat", ext_resume_from=0)
        ready = c.next_event("pty.ready", where=lambda ev: ev["attachment_id"] == "c2")
        assert ready["ext_incarnation"] != incarnation and "ext_offset" not in ready
    finally:
        d.close()


def test_a_resume_older_than_the_scrollback_starts_at_the_oldest_byte_kept():
    d = ListeningDaemon("--scrollback", "4096", workers=2).wait_ready()
    try:
        a = d.authed()
        attach(a, "a", "ta", command=COUNTED, ext_resume_from=0)
        full = collect(a, b"O3000\r\n", timeout=20)
        b = d.authed()
        result = attach(b, "b", "tb", require_existing=True, ext_resume_from=5)
        assert result["replay_bytes"] == 4096, result
        ready = b.next_event("pty.ready")
        assert ready["ext_offset"] == len(full) - 4096
        assert joined(data_events(b, 4096)) == full[-4096:]
    finally:
        d.close()


@pytest.mark.parametrize("bad", [-1, "x", 1.5, True, None])
def test_an_invalid_resume_offset_is_refused_and_the_connection_keeps_working(bad):
    d = ListeningDaemon(workers=1).wait_ready()
    try:
        s = d.authed()
        r = s.call("pty.attach", dict(ident("a", "ta"), cols=80, rows=24, command="exec cat",
                                      ext_resume_from=bad))
        assert not r["ok"] and r["error"]["code"] == "invalid_params", r
        assert "ext_resume_from" in r["error"]["message"], r
        assert s.call("ping")["ok"]
        assert session_names(s) == []
        attach(s, "a", "ta", command="exec cat")
        write(s, "a", "ta", b"still\n")
        collect(s, b"still\r\nstill\r\n")
    finally:
        d.close()


# c. hand-over of the lease


TICKER = ("exec 3<&0; stty -echo; (while read x <&3; do echo GOT:$x; done) & "
          "while :; do echo T$((i+=1)); sleep 0.01; done")


def test_the_lease_moves_to_the_hub_and_back_without_a_gap_or_a_duplicate():
    d = ListeningDaemon(workers=2).wait_ready()
    try:
        a = d.authed()
        attach(a, "a", "ta", command=TICKER)
        out = collect(a, b"T20\r\n")
        b = d.authed()
        assert on_worker(d, a) != on_worker(d, b)
        attach(b, "b", "tb", require_existing=True)  # spans two workers: the hub reads
        write(a, "a", "ta", b"fromA\n")
        write(b, "b", "tb", b"fromB\n")
        out += collect(a, b"GOT:fromB\r\n")
        assert b"GOT:fromB" in collect(b, b"GOT:fromB\r\n")
        assert b.call("pty.detach", ident("b", "tb"))["ok"]  # one worker again: lent back
        write(a, "a", "ta", b"again\n")
        out += collect(a, b"GOT:again\r\n")
        last = numbered(out, b"T")[-1]
        out += collect(a, b"T%d\r\n" % (last + 50))
        assert b"GOT:fromA" in out
        numbers = numbered(out, b"T")
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
    finally:
        d.close()


# d. input is bounded end to end


def process_rss(d: ListeningDaemon) -> dict[int, int]:
    """RSS of each daemon process (supervisor, workers, hub), by pid."""
    out = {}
    for proc in [psutil.Process(d.proc.pid)] + psutil.Process(d.proc.pid).children():
        try:
            out[proc.pid] = proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


def flood_writes(sock: socket.socket, frame: bytes, seconds: float) -> dict:
    """Send whole frames as fast as the daemon takes them for `seconds`, from a thread."""
    stats = {"frames": 0, "error": None}

    def run():
        view, deadline = memoryview(frame), time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                sent = 0
                while sent < len(view):
                    _, writable, _ = select.select([], [sock], [], 30)
                    assert writable, "the daemon stopped reading its client"
                    sent += sock.send(view[sent:])
                stats["frames"] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            stats["error"] = exc

    stats["thread"] = threading.Thread(target=run, daemon=True)
    stats["thread"].start()
    return stats


FLOOD_SECONDS = 4.0
"""Dozens of 3 MB writes: enough for a copy kept per write to show between halfway and the end."""


@pytest.mark.parametrize("spanning", [False, True], ids=["leased", "two-workers"])
def test_streamed_input_at_a_session_that_reads_nothing_keeps_memory_flat(spanning):
    d = ListeningDaemon(workers=2).wait_ready()
    try:
        s = d.authed()
        attach(s, "a", "ta", command="exec sleep 30")
        other = d.authed()
        if spanning:
            assert on_worker(d, s) != on_worker(d, other)
            attach(other, "b", "tb", require_existing=True)
        before = process_rss(d)
        frame = orjson.dumps({"method": "pty.write", "params": dict(
            ident("a", "ta"), data_base64=base64.b64encode(b"x" * 3_000_000).decode())}) + b"\n"
        stats = flood_writes(s.sock, frame, FLOOD_SECONDS)
        peak = dict(before)
        halfway = None
        started = time.monotonic()
        while stats["thread"].is_alive():
            now = process_rss(d)
            peak = {pid: max(peak.get(pid, 0), rss) for pid, rss in now.items()}
            if halfway is None and time.monotonic() - started > FLOOD_SECONDS / 2:
                halfway = dict(peak)
            assert other.call("ping", timeout=30)["ok"]
            time.sleep(0.2)
        assert stats["error"] is None, stats["error"]
        assert stats["frames"] > 3, stats
        growth = {pid: peak[pid] - before.get(pid, peak[pid]) for pid in peak}
        print(f"\nper-process RSS growth over {stats['frames']} writes of 3 MB: "
              + ", ".join(f"{g / 2**20:.1f} MiB" for g in growth.values()))
        # No process grows by more than 16 MiB for the connection (a worker holds one 4 MiB
        # request frame and its decoded bytes, and the link at most one write on top), and
        # none is higher at the end than halfway.
        assert max(growth.values()) < 16 * 2**20, growth
        assert all(peak[pid] - halfway.get(pid, 0) < 4 * 2**20 for pid in halfway), \
            (halfway, peak)
        err = s.next_event("pty.error", timeout=30,
                           where=lambda ev: ev["code"] == "pty_input_queue_full")
        assert err["attachment_id"] == "a" and err["attachment_token"] == "ta"
        s.next_event("pty.exit", timeout=30, where=lambda ev: ev["attachment_id"] == "a")
        assert other.call("ping")["ok"]
        listed, = other.call("pty.list")["result"]["sessions"]
        assert [x["attachment_id"] for x in listed["attachments"]] == (["b"] if spanning else [])
    finally:
        d.close()


# e. the hub link


def hub_link(d: ListeningDaemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(d.state_dir / "hub.sock"))
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


def test_the_hub_refuses_another_link_version_and_drops_garbage_alone():
    d = ListeningDaemon(workers=1).wait_ready()
    try:
        s = d.authed()
        attach(s, "a", "ta", command="exec cat")
        with hub_link(d) as old:
            old.sendall(b'{"type":"hello","version":1}\n')
            reply, = read_to_eof(old).splitlines()
            msg = orjson.loads(reply)
            assert msg["type"] == "refused" and "version" in msg["reason"], msg
        for garbage in (b"{not json\n", b'["hello", 2]\n', b"\xff\xfe\n"):
            with hub_link(d) as bad:
                bad.sendall(garbage)
                read_to_eof(bad)
        write(s, "a", "ta", b"alive\n")
        collect(s, b"alive\r\nalive\r\n")
        t = d.authed()
        attach(t, "n", "tn", session="new", command="echo fresh-$((1+1)); exec cat")
        collect(t, b"fresh-2")
        assert sorted(session_names(t)) == ["lease", "new"]
        assert d.status()["workers"][0]["alive"]
    finally:
        d.close()
