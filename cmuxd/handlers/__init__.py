"""RPC handlers, one module per method family, registered by method name.

A handler is `fn(ctx, req)` and returns a result dict, an awaitable of one, or
NO_RESPONSE; it raises protocol.RPCError for the spec's errors. It knows its connection
only through `ctx` (see connection.ConnectionContext).
"""

from __future__ import annotations

from . import cli, proxy, pty, session, system

METHODS: dict = {}
for _family in (system, proxy, session, pty, cli):
    METHODS.update(_family.METHODS)
