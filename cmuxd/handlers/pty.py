"""pty.*: real terminals, owned by the hub and viewed through attachments.

The handlers validate parameters in the spec's order and call the hub with plain values.
What belongs to the connection stays here: the outbound event queue of each attachment it
created, its in-flight attaches, and turning failed notifications into pty.error events.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from ..protocol import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    NO_RESPONSE,
    NOT_FOUND,
    UNAVAILABLE,
    RPCError,
    param_bool,
    param_int,
    param_str,
    request_base64,
    require_size,
)
from ..pty_rules import (
    MSG_ATTACHMENT_NOT_FOUND,
    MSG_NO_HUB,
    MSG_SESSION_NOT_FOUND,
    OUTBOUND_FRAMES,
    pty_error_event,
)

log = logging.getLogger("cmuxd.pty")

MAX_INFLIGHT_ATTACHES = 32
DRAIN_BATCH = 32
"""Frames written for one attachment before the next one gets a turn."""

WRITE_FAILED = "PTY write failed"
MSG_TOO_MANY_ATTACHES = "too many PTY attach requests are already in progress"
MSG_DUPLICATE_ATTACH = "PTY attach request id is already in progress"


def json_equal(a, b) -> bool:
    """Equality of JSON values: 7 equals 7.0, but "7" is not 7 and true is not 1."""
    ta, tb = type(a), type(b)
    if ta is bool or tb is bool:
        return ta is tb and a == b
    if ta in (int, float) and tb in (int, float):
        return a == b
    if ta is not tb:
        return False
    if ta is list:
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if ta is dict:
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return a == b


class _Outbound:
    __slots__ = ("frames", "scheduled")

    def __init__(self):
        self.frames: deque[dict] = deque()
        self.scheduled = False


class _InflightAttach:
    __slots__ = ("req_id", "has_id", "session_id", "attachment_id", "token", "call", "cancelled")

    def __init__(self, req, session_id, attachment_id, token):
        self.req_id = req.id
        self.has_id = req.has_id and req.id is not None
        self.session_id = session_id
        self.attachment_id = attachment_id
        self.token = token
        self.call: asyncio.Task | None = None
        self.cancelled = False


class PtyConnection:
    """The PTY side of one connection: its hub peer, event queues and in-flight attaches."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.hub = ctx.hub
        self.peer = self.hub.add_peer(self.deliver, self.send_now) \
            if self.hub is not None else None
        self.queues: dict[tuple[str, str, str], _Outbound] = {}
        self.ready: deque[tuple[str, str, str]] = deque()
        self.inflight: list[_InflightAttach] = []
        self.drainer: asyncio.Task | None = None
        self.wakeup: asyncio.Future | None = None
        self.closed = False

    # events from the hub

    def deliver(self, event: dict) -> bool:
        """Queue one event for its attachment; False when that queue is full.

        Queues are keyed by the attachment's identity, so a superseding attachment with the
        same identity continues the queue after its predecessor's pty.exit, in order.
        pty.exit is always accepted: it is the last event of an attachment that is being
        dropped because its queue is full.
        """
        if self.closed:
            return True
        key = (event["session_id"], event["attachment_id"], event["attachment_token"])
        queue = self.queues.get(key)
        if queue is None and not self.ready and self.ctx.can_write():
            # Nothing waits and the peer reads: write it now, not one loop pass later (the
            # echo of a keystroke takes this path).
            self.ctx.send_event(event)
            if event["event"] != "pty.exit":
                self.hub.drained(self.peer, *key, 1)
            return True
        if queue is None:
            queue = self.queues[key] = _Outbound()
        if event["event"] != "pty.exit" and len(queue.frames) >= OUTBOUND_FRAMES:
            return False
        queue.frames.append(event)
        if not queue.scheduled:
            queue.scheduled = True
            self.ready.append(key)
            if self.wakeup is not None and not self.wakeup.done():
                self.wakeup.set_result(None)
            if self.drainer is None:
                self.drainer = self.ctx.spawn(self._drain())
        return True

    def send_now(self, key: tuple[str, str, str], frame: bytes) -> bool:
        """Write an encoded pty.data if it can go out now, in order: nothing of this
        connection is queued and the peer reads. False and nothing done otherwise, and the
        caller delivers it as an event. The echo of a keystroke takes this path: no event
        object, no queue, nothing to count and report drained."""
        if self.closed or self.ready or key in self.queues or not self.ctx.can_write():
            return False
        self.ctx.send_frame(frame)
        return True

    async def _drain(self) -> None:
        """Write queued events while the client reads, each attachment in turn."""
        ctx = self.ctx
        loop = asyncio.get_running_loop()
        while not self.closed:
            if not self.ready:
                self.wakeup = loop.create_future()
                await self.wakeup
                self.wakeup = None
                continue
            key = self.ready.popleft()
            queue = self.queues[key]
            sent = 0
            while queue.frames and sent < DRAIN_BATCH:
                await ctx.writable()
                if self.closed:
                    return
                frame = queue.frames.popleft()
                ctx.send_event(frame)
                if frame["event"] == "pty.exit":
                    if sent:
                        self.hub.drained(self.peer, *key, sent)
                    sent = 0
                else:
                    sent += 1
            if sent:
                self.hub.drained(self.peer, *key, sent)
            if queue.frames:
                self.ready.append(key)
            else:
                queue.scheduled = False
                del self.queues[key]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # In-flight attaches are abandoned: their hub calls are cancelled with the
        # connection's tasks, and remove_peer detaches anything they already created.
        self.inflight.clear()
        self.queues.clear()
        self.ready.clear()
        if self.drainer is not None:
            self.drainer.cancel()
        if self.peer is not None:
            # Detaching needs no wait in-process; the task only makes it one message.
            asyncio.get_running_loop().create_task(self.hub.remove_peer(self.peer))


def _identity(method: str, params: dict) -> tuple[str, str, str]:
    sid = param_str(params, "session_id", trim=True)
    if sid is None:
        raise RPCError(INVALID_PARAMS, f"{method} requires session_id")
    aid = param_str(params, "attachment_id", trim=True)
    if aid is None:
        raise RPCError(INVALID_PARAMS, f"{method} requires attachment_id")
    token = param_str(params, "client_attachment_token", trim=True)
    if token is None:
        raise RPCError(INVALID_PARAMS, f"{method} requires client_attachment_token")
    return sid, aid, token


def pty_attach(ctx, req):
    params = req.params
    sid, aid, token = _identity("pty.attach", params)
    cols, rows = require_size("pty.attach", params)
    if ctx.hub is None:
        raise RPCError(UNAVAILABLE, MSG_NO_HUB)
    conn = ctx.state(PtyConnection)
    if len(conn.inflight) >= MAX_INFLIGHT_ATTACHES:
        raise RPCError(UNAVAILABLE, MSG_TOO_MANY_ATTACHES)
    entry = _InflightAttach(req, sid, aid, token)
    if entry.has_id and any(
        other.has_id and json_equal(other.req_id, entry.req_id) for other in conn.inflight
    ):
        raise RPCError(INVALID_REQUEST, MSG_DUPLICATE_ATTACH)
    resume_from = None
    if "ext_resume_from" in params:
        resume_from = param_int(params, "ext_resume_from")
        if resume_from is None or resume_from < 0:
            raise RPCError(INVALID_PARAMS, "ext_resume_from must be a non-negative integer")
    conn.inflight.append(entry)
    return _attach(ctx, conn, entry, params.get("command"), param_bool(params, "require_existing"),
                   param_bool(params, "input_seq_ack"), cols, rows, resume_from,
                   param_bool(params, "ext_exit_status"))


async def _attach(ctx, conn: PtyConnection, entry: _InflightAttach, command, require_existing,
                  input_seq_ack, cols, rows, resume_from, wants_exit_status):
    """Run the hub's attach beside the connection, so that the connection can read on as
    soon as the session is reserved, whichever task (or link) reports the reservation."""
    loop = asyncio.get_running_loop()
    reserved = loop.create_future()

    def on_reserved() -> None:
        if not reserved.done():
            reserved.set_result(None)

    call = entry.call = loop.create_task(conn.hub.attach(
        conn.peer, entry.session_id, entry.attachment_id, entry.token, cols, rows,
        command if type(command) is str else "", require_existing, input_seq_ack,
        reserved=on_reserved, resume_from=resume_from, wants_exit_status=wants_exit_status,
        env=ctx.env,
    ))
    try:
        await asyncio.wait((reserved, call), return_when=asyncio.FIRST_COMPLETED)
        if not call.done():
            ctx.unblock()
        try:
            result = await call
        except RPCError:
            if entry.cancelled:
                return NO_RESPONSE
            raise
        if entry.cancelled:
            # Cancelled while the hub was attaching: drop what it created, answer nothing.
            await conn.hub.cancel(conn.peer, entry.session_id, entry.attachment_id, entry.token)
            return NO_RESPONSE
        return result
    finally:
        if not call.done():
            call.cancel()
        if entry in conn.inflight:
            conn.inflight.remove(entry)


def pty_attach_cancel(ctx, req):
    params = req.params
    sid = param_str(params, "session_id", trim=True)
    aid = param_str(params, "attachment_id", trim=True)
    token = param_str(params, "client_attachment_token", trim=True)
    if ctx.hub is None:
        return NO_RESPONSE
    conn = ctx.state(PtyConnection)
    if "request_id" in params and params["request_id"] is not None:
        wanted = params["request_id"]
        for entry in conn.inflight:
            if entry.has_id and json_equal(entry.req_id, wanted):
                # It completes on its own and is then dropped (see _attach).
                entry.cancelled = True
                conn.inflight.remove(entry)
                sid, aid, token = entry.session_id, entry.attachment_id, entry.token
                break
    if sid is None or aid is None or token is None:
        return NO_RESPONSE
    return _cancel(conn, sid, aid, token)


async def _cancel(conn: PtyConnection, sid: str, aid: str, token: str):
    await conn.hub.cancel(conn.peer, sid, aid, token)
    return NO_RESPONSE


def _notification(method, fallback: str):
    """Run a pty.write/pty.resize body; without an `id` key, answer only failures, by event."""

    def handler(ctx, req):
        if req.has_id:
            return method(ctx, req)
        _notify(ctx, req.method, req.params, lambda: method(ctx, req), fallback)
        return NO_RESPONSE

    return handler


def _notify(ctx, name: str, params: dict, call, fallback: str) -> None:
    """`call()` for a notification: a failure becomes a pty.error event."""
    try:
        result = call()
    except RPCError as exc:
        _error_event(ctx, params, exc.code, exc.message)
        return
    except Exception:
        log.exception("%s notification failed", name)
        _error_event(ctx, params, "", fallback)
        return
    if type(result) is not dict:
        # A hub over a link has the call already; only a failure is worth waiting for,
        # and the next request need not wait for it.
        ctx.spawn(_notification_reply(ctx, name, params, result, fallback))


async def _notification_reply(ctx, name: str, params: dict, awaitable, fallback: str):
    """The same for a hub that answers later (over a link)."""
    try:
        await awaitable
    except RPCError as exc:
        _error_event(ctx, params, exc.code, exc.message)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s notification failed", name)
        _error_event(ctx, params, "", fallback)
    return NO_RESPONSE


def _error_event(ctx, params: dict, code: str, message: str) -> None:
    """pty.error for a failed notification, if it named an attachment to echo."""
    sid = param_str(params, "session_id", trim=True)
    aid = param_str(params, "attachment_id", trim=True)
    token = param_str(params, "client_attachment_token", trim=True)
    if sid is None or aid is None or token is None:
        return
    ctx.send_event(pty_error_event(sid, aid, token, code, message))


def _write(ctx, req) -> dict:
    params = req.params
    sid, aid, token = _identity("pty.write", params)
    data = request_base64(req, "pty.write requires data_base64")
    seq = None
    if "seq" in params:
        seq = param_int(params, "seq")
        if seq is None or seq < 0:
            raise RPCError(INVALID_PARAMS, "seq must be a non-negative integer")
    if ctx.hub is None:
        raise RPCError(NOT_FOUND, MSG_ATTACHMENT_NOT_FOUND)
    conn = ctx.state(PtyConnection)
    hub, peer = ctx.hub, conn.peer
    result = hub.write(peer, sid, aid, token, data, seq, not req.has_id)
    if not req.has_id:
        # A keystroke that reached its attachment: the next ones, the same frame but for
        # data_base64 (and seq), come here unparsed. (One that failed offers nothing: a
        # client sending writes nobody takes costs one parse each, not two.)

        def keystroke(data: bytes, seq: int | None) -> None:
            _notify(ctx, "pty.write", params,
                    lambda: hub.write(peer, sid, aid, token, data, seq, True), WRITE_FAILED)

        ctx.repeatable(req, "data_base64", None if seq is None else "seq", keystroke)
    return result


def _resize(ctx, req) -> dict:
    params = req.params
    sid = param_str(params, "session_id", trim=True)
    if sid is None:
        raise RPCError(INVALID_PARAMS, "pty.resize requires session_id")
    aid = param_str(params, "attachment_id", trim=True)
    if aid is None:
        raise RPCError(INVALID_PARAMS, "pty.resize requires attachment_id")
    cols, rows = require_size("pty.resize", params)
    token = param_str(params, "client_attachment_token", trim=True)
    if token is None:
        raise RPCError(INVALID_PARAMS, "pty.resize requires client_attachment_token")
    if ctx.hub is None:
        raise RPCError(NOT_FOUND, MSG_ATTACHMENT_NOT_FOUND)
    conn = ctx.state(PtyConnection)
    return ctx.hub.resize(conn.peer, sid, aid, token, cols, rows)


def pty_detach(ctx, req) -> dict:
    sid, aid, token = _identity("pty.detach", req.params)
    if ctx.hub is None:
        raise RPCError(NOT_FOUND, MSG_ATTACHMENT_NOT_FOUND)
    conn = ctx.state(PtyConnection)
    return ctx.hub.detach(conn.peer, sid, aid, token)


def pty_close(ctx, req) -> dict:
    sid = param_str(req.params, "session_id", trim=True)
    if sid is None:
        raise RPCError(INVALID_PARAMS, "pty.close requires session_id")
    if ctx.hub is None:
        raise RPCError(NOT_FOUND, MSG_SESSION_NOT_FOUND)
    return ctx.hub.close(sid)


def pty_list(ctx, req) -> dict:
    """A client that sends `ext_command`, `ext_idle_s` or `ext_incarnation` as true (spec
    §6.8) gets those keys on each entry (`ext_incarnation` with `ext_offset`); an upstream
    client, which sends none, gets the spec's entries."""
    if ctx.hub is None:
        return {"sessions": []}
    params = req.params
    return ctx.hub.list(param_bool(params, "ext_command"), param_bool(params, "ext_idle_s"),
                        param_bool(params, "ext_incarnation"))


METHODS = {
    "pty.attach": pty_attach,
    "pty.attach.cancel": pty_attach_cancel,
    "pty.write": _notification(_write, WRITE_FAILED),
    "pty.resize": _notification(_resize, "PTY resize failed"),
    "pty.detach": pty_detach,
    "pty.close": pty_close,
    "pty.list": pty_list,
}
