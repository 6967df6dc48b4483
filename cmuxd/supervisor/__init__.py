"""The supervisor half of the daemon: listeners, gate (accept + auth), pool, control.

Nothing here imports cmuxd.handlers: the process that owns the listeners never runs an
RPC handler.
"""

from __future__ import annotations

import asyncio
import logging

from ..auth import AuthError, server_credentials
from .listeners import ListenerError, bind_tcp, bind_unix

log = logging.getLogger("cmuxd.supervisor")


def run_daemon(config) -> int:
    """Bind, then serve until SIGTERM/SIGINT; the process exit status."""
    from .daemon import Supervisor

    listeners = []
    try:
        creds = None
        if config.tcp or config.unix_auth == "token":
            creds = server_credentials(config.token_file, config.relay_id)
        for spec in config.tcp:
            listeners.extend(bind_tcp(spec))
        for path in config.sockets:
            listeners.append(bind_unix(path))
    except (AuthError, ListenerError) as exc:
        for listener in listeners:
            listener.close()
        log.error("%s", exc)
        return 1
    if creds is not None:
        log.info("relay id %s (%s)", creds.relay_id, creds.source)
    return asyncio.run(Supervisor(config, listeners, creds).run())
