"""ext.cli.subscribe and cli.response: a connection as the app end of the CLI bridge (spec
§6.7). The requests and their routing live with the sessions (cli_bridge.py); here is only
what the connection says and how a cli.request reaches it."""

from __future__ import annotations

from ..cli_bridge import CAPABILITY, MSG_BRIDGE_OFF
from ..protocol import INVALID_PARAMS, UNAVAILABLE, RPCError, param_str, request_base64
from .pty import PtyConnection


def _peer(ctx) -> int:
    """This connection's hub peer; the bridge's absence is the first error, as upstream."""
    if ctx.hub is None or CAPABILITY not in ctx.hub.capabilities(False):
        raise RPCError(UNAVAILABLE, MSG_BRIDGE_OFF)
    return ctx.state(PtyConnection).peer


def cli_subscribe(ctx, req):
    peer = _peer(ctx)

    def push(event: dict) -> bool:
        if ctx.closing:
            return False
        ctx.send_event(event)
        return True

    return ctx.hub.cli_subscribe(peer, push)


def cli_response(ctx, req):
    peer = _peer(ctx)
    params = req.params
    request_id = param_str(params, "request_id")
    if request_id is None:
        raise RPCError(INVALID_PARAMS, "cli.response requires request_id")
    ok = params.get("ok") is not False  # anything but false is upstream's default, true
    data = request_base64(req, "cli.response requires data_base64") if ok else None
    return ctx.hub.cli_response(peer, request_id, ok, data, params.get("error"))


METHODS = {"ext.cli.subscribe": cli_subscribe, "cli.response": cli_response}
