"""pty.* over a real `cmuxd-remote serve --stdio` child: spec §9 scenarios 23-26 and the
lifetime rules around them (process exit, stdin EOF, long commands, cancel, notifications)."""

from __future__ import annotations

import base64
import os
import stat
import time

import psutil

from helpers import (
    ANY_INT,
    ANY_STR,
    DEFAULT_TIMEOUT,
    POSITIVE_INT,
    dumps,
    error,
    match,
    ok,
    wait_for,
)

PTY_CAPS = {
    "pty.session",
    "pty.session.token",
    "pty.write.notification",
    "pty.resize.notification",
    "pty.attach.cancel",
    "pty.input.seq_ack",
}


def ident(sid="t1", aid="a1", token="tok") -> dict:
    return {"session_id": sid, "attachment_id": aid, "client_attachment_token": token}


def ev(name, sid="t1", aid="a1", token="tok", **extra) -> dict:
    return {"event": name, "session_id": sid, "attachment_id": aid, "attachment_token": token,
            **extra}


def attach_params(sid="t1", aid="a1", token="tok", cols=80, rows=24, **extra) -> dict:
    return {**ident(sid, aid, token), "cols": cols, "rows": rows, **extra}


def output_until(daemon, needle: bytes, sid="t1", aid="a1", token="tok", seen=b"",
                 timeout=DEFAULT_TIMEOUT) -> bytes:
    """Collect this attachment's pty.data until `needle` shows up; returns all of it."""
    deadline = time.monotonic() + timeout
    out = seen
    while needle not in out:
        msg = daemon.next_event(
            "pty.data", timeout=deadline - time.monotonic(),
            where=lambda m: (m["session_id"], m["attachment_id"], m["attachment_token"]) == (sid, aid, token),
        )
        out += base64.b64decode(msg["data_base64"])
    return out


def no_response_before_ping(daemon) -> None:
    """Prove a request got no response: the next response is the ping sent after it."""
    daemon.send({"id": "after", "method": "ping"})
    match(daemon.next_response(), ok({"pong": True}, id="after"))


def test_hello_advertises_pty_without_persistence(daemon):
    caps = set(daemon.call("hello")["result"]["capabilities"])
    assert PTY_CAPS <= caps
    assert "pty.session.persistent_daemon" not in caps


def test_scenario_23_attach_validation_and_require_existing(daemon):
    daemon.expect(
        {"id": 70, "method": "pty.attach", "params": {"session_id": "t1", "attachment_id": "a1", "cols": 80, "rows": 24}},
        error("invalid_params", "pty.attach requires client_attachment_token", id=70),
    )
    daemon.expect(
        {"id": 71, "method": "pty.attach", "params": attach_params(require_existing=True)},
        error("pty_session_not_found", ANY_STR, id=71),
    )
    daemon.expect(
        {"id": 72, "method": "pty.close", "params": {"session_id": "t1"}},
        error("not_found", "PTY session not found", id=72),
    )


def test_scenario_24_lifecycle_with_a_notification_write(daemon):
    daemon.expect(
        {"id": 73, "method": "pty.attach", "params": attach_params(command="printf READY; exec cat")},
        ok({"session_id": "t1", "attachment_id": "a1", "attachment_token": "tok", "attached": True, "replay_bytes": 0}, id=73),
    )
    match(daemon.next_event(), ev("pty.ready"))
    out = output_until(daemon, b"READY")
    daemon.send({"method": "pty.write", "params": {**ident(), "data_base64": "aGkK"}})
    out = output_until(daemon, b"hi", seen=out)
    no_response_before_ping(daemon)
    daemon.expect(
        {"id": 74, "method": "pty.list"},
        ok({"sessions": [{"session_id": "t1", "attachments": [{"attachment_id": "a1", "cols": 80, "rows": 24, "persistent": True}],
                          "effective_cols": 80, "effective_rows": 24, "last_known_cols": 80, "last_known_rows": 24,
                          "scrollback_bytes": ANY_INT}]}, id=74),
    )
    daemon.expect({"id": 75, "method": "pty.detach", "params": ident()}, ok({"detached": True}, id=75))
    match(daemon.next_event("pty.exit"), ev("pty.exit"))
    resp = daemon.expect(
        {"id": 76, "method": "pty.attach", "params": attach_params(aid="a2", token="tok2", require_existing=True)},
        ok({"session_id": "t1", "attachment_id": "a2", "attachment_token": "tok2", "attached": True, "replay_bytes": POSITIVE_INT}, id=76),
    )
    match(daemon.next_event(where=lambda m: m["attachment_id"] == "a2"), ev("pty.ready", aid="a2", token="tok2"))
    replay = b""
    while len(replay) < resp["result"]["replay_bytes"]:
        msg = daemon.next_event(where=lambda m: m["attachment_id"] == "a2")
        assert msg["event"] == "pty.data"
        replay += base64.b64decode(msg["data_base64"])
    assert b"READY" in replay and b"hi" in replay
    assert replay.startswith(out)  # everything so far fits the scrollback
    daemon.expect({"id": 77, "method": "pty.close", "params": {"session_id": "t1"}},
                  ok({"session_id": "t1", "closed": True}, id=77))
    match(daemon.next_event("pty.exit", where=lambda m: m["attachment_id"] == "a2"), ev("pty.exit", aid="a2", token="tok2"))
    daemon.expect({"id": 78, "method": "pty.list"}, ok({"sessions": []}, id=78))


def test_scenarios_25_26_notification_errors_and_input_sequencing(daemon):
    daemon.expect(
        {"id": 1, "method": "pty.attach", "params": attach_params(sid="t2", command="exec cat", input_seq_ack=True)},
        ok({"session_id": "t2", "attachment_id": "a1", "attachment_token": "tok", "attached": True, "replay_bytes": 0}, id=1),
    )
    wrong = {"session_id": "t2", "attachment_id": "a1", "client_attachment_token": "WRONG", "data_base64": "eA=="}
    daemon.send({"method": "pty.write", "params": wrong})
    match(daemon.next_event("pty.error"),
          {"event": "pty.error", "session_id": "t2", "attachment_id": "a1", "attachment_token": "WRONG",
           "error": "PTY attachment not found", "message": "PTY attachment not found", "code": "not_found"})
    daemon.expect({"id": 78, "method": "pty.write", "params": wrong},
                  error("not_found", "PTY attachment not found", id=78))

    good = ident(sid="t2")
    daemon.expect({"id": 80, "method": "pty.write", "params": {**good, "data_base64": "eA==", "seq": 1}},
                  ok({"written": 1}, id=80))
    match(daemon.next_event("pty.input_ack"), ev("pty.input_ack", sid="t2", seq=1))
    daemon.expect({"id": 81, "method": "pty.write", "params": {**good, "data_base64": "eA==", "seq": 3}},
                  error("pty_input_seq_gap", "PTY input sequence gap: got 3, want 2", id=81))
    daemon.expect({"id": 82, "method": "pty.write", "params": {**good, "data_base64": "eA==", "seq": -1}},
                  error("invalid_params", "seq must be a non-negative integer", id=82))
    # In request form the attachment survived the gap; as a notification the gap detaches it.
    daemon.send({"method": "pty.write", "params": {**good, "data_base64": "eA==", "seq": 5}})
    match(daemon.next_event("pty.error"),
          {**ev("pty.error", sid="t2"), "error": "PTY input sequence gap: got 5, want 2",
           "message": "PTY input sequence gap: got 5, want 2", "code": "pty_input_seq_gap"})
    match(daemon.next_event("pty.exit"), ev("pty.exit", sid="t2"))
    daemon.expect({"id": 83, "method": "pty.write", "params": {**good, "data_base64": "eA==", "seq": 2}},
                  error("not_found", "PTY attachment not found", id=83))


def test_parameter_errors_in_spec_order(daemon):
    cases = [
        ("pty.write", {"attachment_id": "a", "client_attachment_token": "t", "data_base64": "%%"}, "invalid_params", "pty.write requires session_id"),
        ("pty.write", {**ident(), "data_base64": 5}, "invalid_params", "pty.write requires data_base64"),
        ("pty.write", {**ident(), "data_base64": "%%%", "seq": -1}, "invalid_params", "data_base64 must be valid base64"),
        ("pty.write", {**ident(), "data_base64": "", "seq": None}, "invalid_params", "seq must be a non-negative integer"),
        ("pty.write", {**ident(), "data_base64": "", "seq": 1.5}, "invalid_params", "seq must be a non-negative integer"),
        ("pty.write", {**ident(), "data_base64": ""}, "not_found", "PTY attachment not found"),
        ("pty.resize", {"session_id": "t1", "attachment_id": "a1", "cols": 0}, "invalid_params", "pty.resize requires cols > 0"),
        ("pty.resize", {"session_id": "t1", "attachment_id": "a1", "cols": 80, "rows": 24}, "invalid_params", "pty.resize requires client_attachment_token"),
        ("pty.resize", {**ident(), "cols": 80, "rows": 24}, "not_found", "PTY attachment not found"),
        ("pty.detach", {"session_id": "  ", "attachment_id": "a1"}, "invalid_params", "pty.detach requires session_id"),
        ("pty.detach", {"session_id": "t1", "attachment_id": "a1"}, "invalid_params", "pty.detach requires client_attachment_token"),
        ("pty.detach", ident(), "not_found", "PTY attachment not found"),
        ("pty.close", {}, "invalid_params", "pty.close requires session_id"),
        ("pty.attach", {"session_id": "t1", "client_attachment_token": "x"}, "invalid_params", "pty.attach requires attachment_id"),
        ("pty.attach", {**ident(), "cols": 80, "rows": 0}, "invalid_params", "pty.attach requires rows > 0"),
        ("pty.attach", {**ident(), "cols": "80", "rows": 24}, "invalid_params", "pty.attach requires cols > 0"),
    ]
    for i, (method, params, code, message) in enumerate(cases):
        daemon.expect({"id": i, "method": method, "params": params}, error(code, message, id=i))
    daemon.expect({"id": "l", "method": "pty.list"}, ok({"sessions": []}, id="l"))


def test_notification_failures_without_identity_are_silent(daemon):
    daemon.send({"method": "pty.write", "params": {"session_id": "t1", "data_base64": "eA=="}})
    daemon.send({"method": "pty.resize", "params": {"session_id": "t1", "attachment_id": "a1", "cols": 1, "rows": 1}})
    no_response_before_ping(daemon)
    assert not daemon.events


def test_resize_notification(daemon):
    daemon.call("pty.attach", attach_params(command="while read l; do stty size; done"))
    daemon.send({"method": "pty.resize", "params": {**ident(), "cols": 100, "rows": 30}})
    no_response_before_ping(daemon)
    daemon.send({"method": "pty.write", "params": {**ident(), "data_base64": base64.b64encode(b"\n").decode()}})
    output_until(daemon, b"30 100")
    # A failed resize notification reports by event and does not detach.
    daemon.send({"method": "pty.resize", "params": {**ident(), "cols": 0, "rows": 30}})
    match(daemon.next_event("pty.error"),
          {**ev("pty.error"), "error": "pty.resize requires cols > 0", "message": "pty.resize requires cols > 0",
           "code": "invalid_params"})
    resp = daemon.call("pty.list")
    assert resp["result"]["sessions"][0]["attachments"][0]["cols"] == 100


def test_shell_exit_ends_the_session(daemon):
    daemon.call("pty.attach", attach_params())
    match(daemon.next_event("pty.ready"), ev("pty.ready"))
    daemon.send({"method": "pty.write", "params": {**ident(), "data_base64": base64.b64encode(b"echo gone-$((40+2)); exit\n").decode()}})
    output_until(daemon, b"gone-42")
    match(daemon.next_event("pty.exit"), ev("pty.exit"))
    daemon.expect({"id": 1, "method": "pty.list"}, ok({"sessions": []}, id=1))
    daemon.expect({"id": 2, "method": "pty.close", "params": {"session_id": "t1"}},
                  error("not_found", "PTY session not found", id=2))


def test_long_command_runs_from_a_private_temporary_file(daemon):
    filler = "# " + "x" * 130_000 + "\n"
    command = 'printf "[%s]" "$0"\n' + filler + "printf END\nexec sleep 1000"
    assert len(command.encode()) > 122_880
    daemon.call("pty.attach", attach_params(command=command))
    out = output_until(daemon, b"END")
    path = out[out.index(b"[") + 1 : out.index(b"]")].decode()
    info = os.stat(path)
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o400
    with open(path) as f:
        assert f.read() == command
    daemon.call("pty.close", {"session_id": "t1"})
    match(daemon.next_event("pty.exit"), ev("pty.exit"))
    wait_for(lambda: not os.path.exists(path), message="the script to be deleted")


def test_stdin_eof_kills_the_sessions(daemon):
    daemon.call("pty.attach", attach_params(command="echo pid=$$; exec sleep 1000"))
    out = output_until(daemon, b"\r\n")
    pid = int(out.split(b"pid=")[1].split(b"\r\n")[0])
    daemon.close_stdin()
    assert daemon.wait() == 0

    def gone():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, message="the PTY process to be killed")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _job_pid(daemon, command: str) -> int:
    """Attach `command`, which prints `job=PID` for a process it starts; that pid, alive."""
    daemon.call("pty.attach", attach_params(command=command))
    out = output_until(daemon, b"\r\n", seen=b"")
    pid = int(out.split(b"job=")[1].split(b"\r\n")[0])
    assert not _gone(pid)
    return pid


def test_close_ends_jobs_in_process_groups_of_their_own(daemon):
    """A shell with job control runs `sleep &` in its own process group, which no signal to
    the leader's group reaches: pty.close ends it all the same."""
    pid = _job_pid(daemon, "set -m; sleep 96 & echo job=$!; exec cat")
    assert os.getpgid(pid) != os.getsid(pid)
    assert daemon.call("pty.close", {"session_id": "t1"})["result"]["closed"] is True
    wait_for(lambda: _gone(pid), message="the background job to be killed")


def test_stopping_ends_processes_that_outlive_their_leader(daemon):
    """A process that ignores SIGHUP outlives the leader the SIGHUP ended: the SIGKILL that
    follows the grace period still reaches it."""
    pid = _job_pid(daemon, "(trap '' HUP; exec sleep 98) & echo job=$!; exec cat")
    daemon.close_stdin()
    assert daemon.wait() == 0
    wait_for(lambda: _gone(pid), message="the process that ignored SIGHUP to be killed")


def test_cancel_never_responds_and_detaches_a_completed_attach(daemon):
    daemon.call("pty.attach", attach_params(command="exec cat"))
    daemon.send({"id": 9, "method": "pty.attach.cancel", "params": ident()})
    match(daemon.next_event("pty.exit"), ev("pty.exit"))
    no_response_before_ping(daemon)
    # Unknown request ids and unknown attachments: still nothing.
    daemon.send({"id": 10, "method": "pty.attach.cancel", "params": {"request_id": 12345}})
    daemon.send({"method": "pty.attach.cancel"})
    no_response_before_ping(daemon)
    daemon.expect({"id": 11, "method": "pty.list"},
                  ok({"sessions": [{"session_id": "t1", "attachments": [], "effective_cols": 80, "effective_rows": 24,
                                    "last_known_cols": 80, "last_known_rows": 24, "scrollback_bytes": ANY_INT}]}, id=11))


def test_cancelling_an_attach_in_flight_by_request_id(daemon):
    # Both frames arrive together: the attach reserves its session and lets the next request
    # in while the process starts, so the cancel finds it in flight (7.0 equals 7).
    daemon.send_raw(
        dumps({"id": 7, "method": "pty.attach", "params": attach_params(command="exec cat")})
        + dumps({"id": 8, "method": "pty.attach.cancel", "params": {"request_id": 7.0}})
    )
    no_response_before_ping(daemon)
    # What the cancelled attach created is dropped: its last event is pty.exit.
    daemon.next_event("pty.exit", where=lambda m: m["attachment_id"] == "a1")
    assert all(m["event"] in ("pty.ready", "pty.data") for m in daemon.events)
    daemon.expect({"id": 11, "method": "pty.list"},
                  ok({"sessions": [{"session_id": "t1", "attachments": [], "effective_cols": 80, "effective_rows": 24,
                                    "last_known_cols": 80, "last_known_rows": 24, "scrollback_bytes": ANY_INT}]}, id=11))
    no_response_before_ping(daemon)


def test_duplicate_in_flight_attach_id(daemon):
    daemon.send_raw(
        dumps({"id": [1, {"k": 2}], "method": "pty.attach", "params": attach_params(sid="d1", command="exec cat")})
        + dumps({"id": [1.0, {"k": 2.0}], "method": "pty.attach", "params": attach_params(sid="d2", command="exec cat")})
        + dumps({"id": True, "method": "pty.attach", "params": attach_params(sid="d3", command="exec cat")})
        + dumps({"id": 1, "method": "pty.attach", "params": attach_params(sid="d4", command="exec cat")})
    )
    responses = [daemon.next_response() for _ in range(4)]
    by_session = {}
    for resp in responses:
        if resp["ok"]:
            by_session[resp["result"]["session_id"]] = resp
        else:
            match(resp, error("invalid_request", "PTY attach request id is already in progress", id=[1.0, {"k": 2.0}]))
    assert sorted(by_session) == ["d1", "d3", "d4"]


def test_close_right_after_attach_sees_the_session(daemon):
    daemon.send_raw(
        dumps({"id": 1, "method": "pty.attach", "params": attach_params(command="exec cat")})
        + dumps({"id": 2, "method": "pty.close", "params": {"session_id": "t1"}})
    )
    responses = {r["id"]: r for r in (daemon.next_response(), daemon.next_response())}
    match(responses[2], ok({"session_id": "t1", "closed": True}, id=2))
    daemon.expect({"id": 3, "method": "pty.list"}, ok({"sessions": []}, id=3))
    # The attach either completed (its attachment saw pty.ready, then pty.exit) or never
    # went live; it is not an error after a pty.ready.
    events = [e["event"] for e in daemon.events]
    if "pty.ready" in events:
        assert events[-1] == "pty.exit"
        assert responses[1]["ok"] is True and responses[1]["result"]["attached"] is True
    else:
        assert responses[1]["ok"] is False
