"""The CLI bridge (spec §6.7): a process inside a real PTY session talks to
$CMUX_SOCKET_PATH with a plain socket client (tests/cli_probe.py), and connections attached
to that session that subscribed answer its requests."""

from __future__ import annotations

import base64
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
import pytest

from cmuxd.attach import MSG_NOT_THE_APP

from helpers import DEFAULT_TIMEOUT, wait_for
from terminal import Terminal

PROBE = Path(__file__).resolve().parent.parent / "cli_probe.py"
NOTIFY = orjson.dumps({"id": "n1", "method": "notification.create",
                       "params": {"title": "Build", "body": "done in 3 s"}})
NO_APP = "no cmux app is attached to this session"
TIMED_OUT = "timed out waiting for cmux app response"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def refusal(code: str) -> bytes:
    return orjson.dumps({"ok": False, "error": {"code": code, "message": "not this window"}})


class ProbeSession:
    """A PTY session running the probe, watched through one attachment of `stream`."""

    def __init__(self, stream, sid: str, aid: str = "a", setsid: bool = False):
        self.stream, self.sid, self.aid = stream, sid, aid
        self.out = b""
        prefix = "setsid -w " if setsid else ""
        r = stream.call("pty.attach", {
            "session_id": sid, "attachment_id": aid, "client_attachment_token": "t",
            "cols": 200, "rows": 50,
            "command": f"stty -echo; exec {prefix}{sys.executable} {PROBE}"})
        assert r["ok"], r
        self.read_until(rb"READY")
        self.path = re.search(rb"PATH (\S*)", self.out).group(1).decode()

    def read_until(self, pattern: bytes, timeout: float = DEFAULT_TIMEOUT) -> re.Match:
        deadline = time.monotonic() + timeout
        while (found := re.search(pattern, self.out)) is None:
            ev = self.stream.next_event(
                "pty.data", timeout=deadline - time.monotonic(),
                where=lambda m: (m["session_id"], m["attachment_id"]) == (self.sid, self.aid))
            self.out += base64.b64decode(ev["data_base64"])
        return found

    def type(self, text: str) -> None:
        r = self.stream.call("pty.write", {
            "session_id": self.sid, "attachment_id": self.aid, "client_attachment_token": "t",
            "data_base64": b64(text.encode() + b"\n")})
        assert r["ok"], r

    def cli(self, tag: str, line: bytes, verb: str = "send") -> None:
        self.type(f"{tag} {verb} {b64(line)}")

    def reply(self, tag: str, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        found = self.read_until(rf"REPLY {tag} (\S*)\r?\n".encode(), timeout)
        return base64.b64decode(found.group(1))

    def error_of(self, tag: str, timeout: float = DEFAULT_TIMEOUT) -> dict:
        reply = self.reply(tag, timeout)
        assert reply.endswith(b"\n") and reply.count(b"\n") == 1, reply
        msg = orjson.loads(reply)
        assert msg["ok"] is False, msg
        return msg["error"]


class ProbeSessionView(ProbeSession):
    """A further attachment to a probe session that is already running."""

    def __init__(self, stream, sid: str, aid: str):
        self.stream, self.sid, self.aid = stream, sid, aid
        self.out = b""


def subscribe(stream) -> None:
    assert stream.call("ext.cli.subscribe") == {"id": stream._next_id, "ok": True,
                                                "result": {"subscribed": True}}


def request_of(stream, timeout: float = DEFAULT_TIMEOUT) -> dict:
    return stream.next_event("cli.request", timeout=timeout)


def respond(stream, request_id, data: bytes | None = None, **params) -> dict:
    if data is not None:
        params["data_base64"] = b64(data)
    return stream.call("cli.response", {"request_id": request_id, **params})


def no_cli_request(stream, wait: float = 0.5) -> None:
    """Nothing of the bridge reached `stream` (checked after a ping has round-tripped)."""
    time.sleep(wait)
    assert stream.call("ping")["ok"]
    assert [e for e in stream.events if e["event"] == "cli.request"] == []


@pytest.fixture
def daemon(spawn_listening):
    return spawn_listening(workers=1)


# --- the round trip ------------------------------------------------------------------------


@pytest.mark.parametrize("setsid", [False, True], ids=["shell", "after-setsid"])
def test_a_request_from_inside_the_session_reaches_the_subscribed_client(daemon, setsid):
    app = daemon.authed()
    assert "cli.bridge" in app.call("hello")["result"]["capabilities"]
    session = ProbeSession(app, "work", setsid=setsid)
    subscribe(app)
    session.cli("r1", NOTIFY)
    req = request_of(app)
    assert re.fullmatch(r"cli-\d+", req["request_id"]) and set(req) == {
        "event", "request_id", "data_base64"}
    assert base64.b64decode(req["data_base64"]) == NOTIFY
    answer = b'{"id":"n1","ok":true,"result":{}}'
    assert respond(app, req["request_id"], answer)["result"] == {"delivered": True}
    assert session.reply("r1") == answer + b"\n"
    # The socket is the owner's alone, in a directory that is the owner's alone.
    path = Path(session.path)
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.parent == daemon.state_dir / "cli"


def test_each_request_reaches_only_its_own_sessions_connection(spawn_listening):
    d = spawn_listening(workers=2)
    a, b = d.authed(), d.authed()
    one, two = ProbeSession(a, "one"), ProbeSession(b, "two")
    assert one.path != two.path
    subscribe(a)
    subscribe(b)
    one.cli("r1", b'{"from":"one"}')
    two.cli("r2", b'{"from":"two"}')
    req_a, req_b = request_of(a), request_of(b)
    assert base64.b64decode(req_a["data_base64"]) == b'{"from":"one"}'
    assert base64.b64decode(req_b["data_base64"]) == b'{"from":"two"}'
    # Neither can answer the other's request.
    assert respond(a, req_b["request_id"], b"{}")["error"]["code"] == "not_found"
    assert respond(b, req_a["request_id"], b"{}")["error"]["code"] == "not_found"
    assert respond(a, req_a["request_id"], b'"for one"')["ok"]
    assert respond(b, req_b["request_id"], b'"for two"')["ok"]
    assert one.reply("r1") == b'"for one"\n'
    assert two.reply("r2") == b'"for two"\n'
    no_cli_request(a, 0)
    no_cli_request(b, 0)


def test_an_attachment_that_did_not_subscribe_gets_nothing_and_the_cli_hears_at_once(daemon):
    viewer = daemon.authed()
    session = ProbeSession(viewer, "work")
    bystander = daemon.authed()
    subscribe(bystander)  # subscribed, but not attached to this session
    started = time.monotonic()
    session.cli("r1", NOTIFY)
    error = session.error_of("r1")
    assert error["code"] == "cloud_cli_unavailable" and error["message"].startswith(NO_APP)
    assert time.monotonic() - started < 10  # not the 15 s wait for an app
    no_cli_request(viewer, 0)
    no_cli_request(bystander, 0)


def test_no_answer_times_out_and_a_late_answer_is_not_found(spawn_listening):
    """With the reply timeout at 3 s instead of 15 s: the same path, sooner."""
    daemon = spawn_listening(workers=1, env={"CMUXD_CLI_REPLY_TIMEOUT": "3"})
    app = daemon.authed()
    session = ProbeSession(app, "work")
    subscribe(app)
    session.cli("r1", NOTIFY)
    req = request_of(app)
    # A reply too large for a 4 MiB frame cannot be read, so it answers nothing: the frame
    # gets the spec's error, the connection goes on, and the CLI is told when time is up.
    huge = b64(b"x" * (3 * 1024 * 1024 + 4))
    app.send_raw(orjson.dumps({"id": 1, "method": "cli.response", "params": {
        "request_id": req["request_id"], "data_base64": huge}}) + b"\n")
    assert app.next_response()["error"] == {"code": "invalid_request",
                                            "message": "request frame exceeds maximum size"}
    assert app.call("ping")["ok"]
    error = session.error_of("r1")
    assert error == {"code": "cloud_cli_unavailable", "message": TIMED_OUT}
    late = respond(app, req["request_id"], b'{"ok":true}')
    assert late["error"] == {"code": "not_found", "message": "cloud CLI request not found"}
    # The bridge still works.
    session.cli("r2", NOTIFY)
    assert respond(app, request_of(app)["request_id"], b"{}")["ok"]
    assert session.reply("r2") == b"{}\n"


def test_a_subscription_outlives_a_new_pty_hub(daemon):
    app = daemon.authed()
    ProbeSession(app, "old")
    subscribe(app)
    hubs = [p for p in psutil.Process(daemon.proc.pid).children()
            if "cmuxd.hub_process" in " ".join(p.cmdline())]
    assert len(hubs) == 1
    hubs[0].kill()
    assert app.next_event("pty.exit", timeout=10)["session_id"] == "old"
    # The supervisor starts a new hub at once, and the worker links up with it again.
    wait_for(lambda: app.call("pty.list").get("ok"), timeout=15)
    session = ProbeSession(app, "new")
    session.cli("r1", NOTIFY)  # no second ext.cli.subscribe
    assert respond(app, request_of(app)["request_id"], b"{}")["ok"]
    assert session.reply("r1") == b"{}\n"


# --- several candidates --------------------------------------------------------------------


def test_a_refusal_passes_the_request_to_the_next_candidate(daemon):
    first = daemon.authed()
    session = ProbeSession(first, "work", aid="first")
    second = daemon.authed()
    assert second.call("pty.attach", {"session_id": "work", "attachment_id": "second",
                                      "client_attachment_token": "t", "cols": 80,
                                      "rows": 24})["ok"]
    subscribe(first)
    subscribe(second)
    session.cli("r1", NOTIFY)
    # Most recently attached first.
    asked = request_of(second)
    no_cli_request(first, 0)
    assert respond(second, asked["request_id"], refusal("remote_cli_workspace_denied"))["ok"]
    again = request_of(first)
    assert again["request_id"] != asked["request_id"]
    assert again["data_base64"] == asked["data_base64"]
    # The one that refused cannot answer any more.
    assert respond(second, asked["request_id"], b"{}")["error"]["code"] == "not_found"
    assert respond(first, again["request_id"], b'{"ok":true}')["ok"]
    assert session.reply("r1") == b'{"ok":true}\n'
    # When every candidate refuses, the CLI gets the last refusal.
    session.cli("r2", NOTIFY)
    assert respond(second, request_of(second)["request_id"], refusal("remote_cli_unscoped"))["ok"]
    last = refusal("remote_cli_workspace_denied")
    assert respond(first, request_of(first)["request_id"], last)["ok"]
    assert session.reply("r2") == last + b"\n"


def test_the_subscribed_connection_dropping_mid_request(daemon):
    first = daemon.authed()
    session = ProbeSession(first, "work", aid="first")
    second = daemon.authed()
    assert second.call("pty.attach", {"session_id": "work", "attachment_id": "second",
                                      "client_attachment_token": "t", "cols": 80,
                                      "rows": 24})["ok"]
    subscribe(first)
    subscribe(second)
    session.cli("r1", NOTIFY)
    request_of(second)
    second.close()  # the request moves to the next candidate
    moved = request_of(first)
    assert respond(first, moved["request_id"], b'"moved"')["ok"]
    assert session.reply("r1") == b'"moved"\n'
    # With no candidate left, the CLI hears at once (seen through a viewer that did not
    # subscribe, attached before the request).
    viewer = daemon.authed()
    assert viewer.call("pty.attach", {"session_id": "work", "attachment_id": "viewer",
                                      "client_attachment_token": "t", "cols": 80,
                                      "rows": 24})["ok"]
    view = ProbeSessionView(viewer, "work", "viewer")
    session.cli("r2", NOTIFY)
    request_of(first)
    first.close()
    error = view.error_of("r2", timeout=10)
    assert error["code"] == "cloud_cli_unavailable" and error["message"].startswith(NO_APP)
    no_cli_request(viewer, 0)


# --- bad input -----------------------------------------------------------------------------


def test_cli_response_errors(daemon):
    app = daemon.authed()
    session = ProbeSession(app, "work")
    subscribe(app)
    assert respond(app, None, b"{}")["error"] == {
        "code": "invalid_params", "message": "cli.response requires request_id"}
    assert respond(app, "cli-999", b"{}")["error"] == {
        "code": "not_found", "message": "cloud CLI request not found"}
    session.cli("r1", NOTIFY)
    rid = request_of(app)["request_id"]
    assert respond(app, rid)["error"] == {
        "code": "invalid_params", "message": "cli.response requires data_base64"}
    assert respond(app, rid, data_base64="%%%")["error"] == {
        "code": "invalid_params", "message": "data_base64 must be valid base64"}
    # None of that answered it; an app's own error does, once.
    assert respond(app, rid, ok=False, error="workspace is locked")["result"] == {
        "delivered": True}
    assert respond(app, rid, b"{}")["error"]["code"] == "not_found"
    assert session.error_of("r1") == {"code": "cloud_cli_unavailable",
                                      "message": "workspace is locked"}
    # An error without words, and an error object, reach the CLI too.
    for tag, error, expected in (
            ("r2", None, {"code": "cloud_cli_unavailable",
                          "message": "cmux app rejected cloud CLI request"}),
            ("r3", {"code": "app_busy", "message": "try later"},
             {"code": "app_busy", "message": "try later"})):
        session.cli(tag, NOTIFY)
        assert respond(app, request_of(app)["request_id"], ok=False, error=error)["ok"]
        assert session.error_of(tag) == expected
    assert app.call("ping")["ok"]


def test_a_cli_that_hangs_up_is_forgotten(daemon):
    app = daemon.authed()
    session = ProbeSession(app, "work")
    subscribe(app)
    session.cli("r1", NOTIFY, verb="drop")
    session.read_until(rb"DROPPED r1")
    rid = request_of(app)["request_id"]
    time.sleep(2)  # the bridge checks for a hang-up four times a second
    assert respond(app, rid, b"{}")["error"]["code"] == "not_found"
    session.cli("r2", NOTIFY)
    assert respond(app, request_of(app)["request_id"], b"{}")["ok"]
    assert session.reply("r2") == b"{}\n"


def test_an_oversized_request_is_refused_and_the_bridge_goes_on(daemon):
    app = daemon.authed()
    session = ProbeSession(app, "work")
    subscribe(app)
    session.type(f"r1 big {4 * 1024 * 1024}")
    assert session.error_of("r1") == {"code": "request_too_large",
                                      "message": "cloud CLI request exceeded maximum size"}
    no_cli_request(app, 0)
    # The largest request that fits (4 MiB with its LF) goes through whole.
    session.type(f"r2 big {4 * 1024 * 1024 - 1}")
    req = request_of(app)
    assert base64.b64decode(req["data_base64"]) == b"x" * (4 * 1024 * 1024 - 1)
    assert respond(app, req["request_id"], b"{}")["ok"]
    assert session.reply("r2") == b"{}\n"


def test_a_seventeenth_pending_request_is_refused_at_once(daemon):
    app = daemon.authed()
    session = ProbeSession(app, "work")
    subscribe(app)
    for n in range(16):
        session.cli(f"p{n}", NOTIFY)
    waiting = [request_of(app)["request_id"] for _ in range(16)]
    session.cli("p16", NOTIFY)
    error = session.error_of("p16", timeout=10)
    assert error["code"] == "cloud_cli_unavailable" and "16" in error["message"]
    for n, rid in enumerate(waiting):
        assert respond(app, rid, b'"ok"')["ok"]
    for n in range(16):
        assert session.reply(f"p{n}") == b'"ok"\n'
    session.cli("p17", NOTIFY)
    assert respond(app, request_of(app)["request_id"], b"{}")["ok"]
    assert session.reply("p17") == b"{}\n"


NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
CONNECT = ("import socket,sys\n"
           "s=socket.socket(socket.AF_UNIX)\n"
           "s.connect(sys.argv[1])\n"
           "try:\n"
           "    s.sendall(b'{\"method\":\"notification.create\"}\\n')\n"
           "    print(repr(s.recv(100)))\n"
           "except ConnectionError:\n"
           "    print('closed')\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_another_uid_is_kept_off_the_bridge(daemon):
    app = daemon.authed()
    session = ProbeSession(app, "work")
    subscribe(app)
    # The file mode stops it first...
    plain = subprocess.run(NOBODY + [sys.executable, "-c", CONNECT, session.path],
                           capture_output=True, timeout=30)
    assert plain.returncode != 0 and b"PermissionError" in plain.stderr, plain
    # ...and one that may pass file modes (CAP_DAC_OVERRIDE) is refused by its uid.
    capable = subprocess.run(
        NOBODY + ["--inh-caps", "+dac_override", "--ambient-caps", "+dac_override",
                  sys.executable, "-c", CONNECT, session.path],
        capture_output=True, timeout=30)
    assert capable.returncode == 0 and capable.stdout.strip() in (b"b''", b"closed"), capable
    no_cli_request(app, 0)
    assert "refused a CLI of uid 65534" in daemon.log()
    # The owner's CLI still gets through.
    session.cli("r1", NOTIFY)
    assert respond(app, request_of(app)["request_id"], b"{}")["ok"]
    assert session.reply("r1") == b"{}\n"


# --- serve --stdio -------------------------------------------------------------------------


def stdio_env() -> dict:
    env = dict(os.environ)
    env.pop("CMUX_SOCKET_PATH", None)
    return env


def test_standalone_stdio_has_the_bridge_for_its_own_sessions(spawn_daemon):
    d = spawn_daemon(env=stdio_env())
    assert "cli.bridge" in d.call("hello")["result"]["capabilities"]
    session = ProbeSession(d, "work")
    subscribe(d)
    folder = Path(session.path).parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    session.cli("r1", NOTIFY)
    assert respond(d, request_of(d)["request_id"], b"{}")["ok"]
    assert session.reply("r1") == b"{}\n"
    d.close_stdin()
    assert d.wait() == 0
    assert not folder.exists()


def test_no_cli_bridge_turns_it_off(spawn_daemon, spawn_listening):
    d = spawn_daemon("--no-cli-bridge", env=stdio_env())
    assert "cli.bridge" not in d.call("hello")["result"]["capabilities"]
    session = ProbeSession(d, "work")
    assert session.path == ""
    off = {"code": "unavailable", "message": "cloud CLI bridge is not enabled"}
    assert d.call("ext.cli.subscribe")["error"] == off
    assert respond(d, "cli-1", b"{}")["error"] == off
    daemon = spawn_listening("--no-cli-bridge", workers=1)
    app = daemon.authed()
    assert "cli.bridge" not in app.call("hello")["result"]["capabilities"]
    assert app.call("ext.cli.subscribe")["error"] == off
    assert ProbeSession(app, "work").path == ""


# --- cmuxd-remote attach -------------------------------------------------------------------


def shown_reply(tag: str, reply: dict) -> bytes:
    """How the probe shows the reply line on a terminal."""
    return f"REPLY {tag} {b64(orjson.dumps(reply, option=orjson.OPT_APPEND_NEWLINE))}\r\n".encode()


def test_attach_shows_a_notification_and_refuses_other_requests(daemon):
    term = Terminal(daemon.cli_command() + [
        "attach", f"cmux://127.0.0.1:{daemon.port}", "work", "--command",
        f"stty -echo; exec {sys.executable} {PROBE}"], daemon.client_env())
    try:
        term.read_until(b"READY")
        term.write(f"r1 send {b64(NOTIFY)}\r".encode())
        term.read_until(b"\r\n[notification] Build - done in 3 s\r\n")
        delivered = {"id": "n1", "ok": True, "result": {"delivered": True}}
        term.read_until(shown_reply("r1", delivered))
        other = orjson.dumps({"id": 7, "method": "surface.list", "params": {}})
        term.write(f"r2 send {b64(other)}\r".encode())
        refused = {"id": 7, "ok": False,
                   "error": {"code": "method_not_found", "message": MSG_NOT_THE_APP}}
        term.read_until(shown_reply("r2", refused))
        assert term.out.count(b"[notification]") == 1
    finally:
        term.close()
