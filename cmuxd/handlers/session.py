"""session.*: per-connection size coordinators where the smallest screen wins.

Bookkeeping only: no process is attached to a session. The size rule itself lives in
`SizeCoordinator` so that PTY sessions apply exactly the same rule.
"""

from __future__ import annotations

from datetime import datetime, timezone

from ..protocol import INVALID_PARAMS, NOT_FOUND, RPCError, param_str, require_size
from ..sizing import SizeCoordinator


def rfc3339_now() -> str:
    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%S")
    if now.microsecond:
        stamp += ("." + f"{now.microsecond:06d}").rstrip("0")
    return stamp + "Z"


SNAPSHOT_FIELDS = ("cols", "rows", "updated_at")


class Sessions:
    """The session.* sessions of one connection."""

    def __init__(self, ctx):
        self.by_id: dict[str, SizeCoordinator] = {}
        self.counter = 0

    def get(self, session_id: str) -> SizeCoordinator:
        session = self.by_id.get(session_id)
        if session is None:
            raise RPCError(NOT_FOUND, "session not found")
        return session

    def close(self) -> None:
        self.by_id.clear()


def _require(method: str, params: dict, *, attachment: bool, size: bool, trim: bool):
    session_id = param_str(params, "session_id", trim=trim)
    if session_id is None:
        raise RPCError(INVALID_PARAMS, f"{method} requires session_id")
    attachment_id = cols = rows = None
    if attachment:
        attachment_id = param_str(params, "attachment_id", trim=trim)
        if attachment_id is None:
            raise RPCError(INVALID_PARAMS, f"{method} requires attachment_id")
    if size:
        cols, rows = require_size(method, params)
    return session_id, attachment_id, cols, rows


def session_open(ctx, req) -> dict:
    sessions = ctx.state(Sessions)
    session_id = param_str(req.params, "session_id")
    if session_id is None:
        sessions.counter += 1
        session_id = f"sess-{sessions.counter}"
    session = sessions.by_id.get(session_id)
    if session is None:
        session = sessions.by_id[session_id] = SizeCoordinator()
    return session.snapshot(session_id, SNAPSHOT_FIELDS)


def session_attach(ctx, req) -> dict:
    sid, aid, cols, rows = _require(
        "session.attach", req.params, attachment=True, size=True, trim=True
    )
    session = ctx.state(Sessions).get(sid)
    session.set(aid, cols, rows, updated_at=rfc3339_now())
    return session.snapshot(sid, SNAPSHOT_FIELDS)


def session_resize(ctx, req) -> dict:
    sid, aid, cols, rows = _require(
        "session.resize", req.params, attachment=True, size=True, trim=True
    )
    session = ctx.state(Sessions).get(sid)
    if aid not in session.attachments:
        raise RPCError(NOT_FOUND, "attachment not found")
    session.set(aid, cols, rows, updated_at=rfc3339_now())
    return session.snapshot(sid, SNAPSHOT_FIELDS)


def session_detach(ctx, req) -> dict:
    sid, aid, _, _ = _require(
        "session.detach", req.params, attachment=True, size=False, trim=False
    )
    session = ctx.state(Sessions).get(sid)
    if aid not in session.attachments:
        raise RPCError(NOT_FOUND, "attachment not found")
    session.remove(aid)
    return session.snapshot(sid, SNAPSHOT_FIELDS)


def session_status(ctx, req) -> dict:
    sid, _, _, _ = _require("session.status", req.params, attachment=False, size=False, trim=False)
    return ctx.state(Sessions).get(sid).snapshot(sid, SNAPSHOT_FIELDS)


def session_close(ctx, req) -> dict:
    sid, _, _, _ = _require("session.close", req.params, attachment=False, size=False, trim=False)
    sessions = ctx.state(Sessions)
    sessions.get(sid)
    del sessions.by_id[sid]
    return {"session_id": sid, "closed": True}


METHODS = {
    "session.open": session_open,
    "session.attach": session_attach,
    "session.resize": session_resize,
    "session.detach": session_detach,
    "session.status": session_status,
    "session.close": session_close,
}
