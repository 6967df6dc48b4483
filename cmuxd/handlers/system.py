"""hello, ping and ext.status: what the daemon is, whether it is alive, how busy it is."""

from __future__ import annotations

import time

from .. import __version__
from ..protocol import METHOD_NOT_FOUND, RPCError, unknown_method_message

BASE_CAPABILITIES = (
    "session.basic",
    "session.resize.min",
    "proxy.http_connect",
    "proxy.socks5",
    "proxy.stream",
    "proxy.stream.push",
    "ext.proxy.read",
)

PONG = {"pong": True}


STATUS_CAPABILITY = "ext.status"


class DaemonFigures:
    """What a worker knows of the whole daemon: the supervisor's start, the worker count and
    the connections of the other workers as its last heartbeat told, plus its own open
    connections, counted live so the asking connection always counts itself.

    The control socket is local only, so a fleet check from another host learns these figures
    through ext.status instead; the other workers' share may lag by one heartbeat.
    """

    __slots__ = ("started", "workers", "elsewhere", "here")

    def __init__(self, here=(), started: float | None = None, workers: int | None = None,
                 elsewhere: int = 0):
        self.here = here  # a live collection of this worker's connections
        self.started = started
        self.workers = workers
        self.elsewhere = elsewhere

    def update(self, data: dict | None) -> None:
        if data:
            self.started = data.get("started", self.started)
            self.workers = data.get("workers", self.workers)
            self.elsewhere = data.get("elsewhere", self.elsewhere)

    def as_result(self) -> dict:
        uptime = None if self.started is None else round(max(0.0, time.time() - self.started), 3)
        return {"uptime": uptime, "workers": self.workers,
                "connections": self.elsewhere + len(self.here)}


def capabilities(ctx) -> list[str]:
    caps = list(BASE_CAPABILITIES)
    if ctx.daemon is not None:
        caps.append(STATUS_CAPABILITY)
    hub = ctx.hub
    if hub is not None:
        caps.extend(hub.capabilities(persistent=ctx.transport != "stdio"))
    return caps


def hello(ctx, req) -> dict:
    return {"name": "cmuxd-remote", "version": __version__, "capabilities": capabilities(ctx)}


def ping(ctx, req) -> dict:
    return PONG


def status(ctx, req) -> dict:
    if ctx.daemon is None:
        # serve --stdio is one connection of its own, not a daemon with figures to report.
        raise RPCError(METHOD_NOT_FOUND, unknown_method_message(req.method))
    return dict(ctx.daemon.as_result(), caller=ctx.caller)


METHODS = {"hello": hello, "ping": ping, "ext.status": status}
