"""hello and ping: what the daemon is and whether it is alive."""

from __future__ import annotations

from .. import __version__

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


def capabilities(ctx) -> list[str]:
    caps = list(BASE_CAPABILITIES)
    hub = ctx.hub
    if hub is not None:
        caps.extend(hub.capabilities(persistent=ctx.transport != "stdio"))
    return caps


def hello(ctx, req) -> dict:
    return {"name": "cmuxd-remote", "version": __version__, "capabilities": capabilities(ctx)}


def ping(ctx, req) -> dict:
    return PONG


METHODS = {"hello": hello, "ping": ping}
