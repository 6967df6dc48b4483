"""The supervisor half of the daemon: listeners, gate (accept + auth), pool, control.

Nothing here imports cmuxd.handlers: the process that owns the listeners never runs an
RPC handler.
"""

from __future__ import annotations

import asyncio
import logging
import os

from ..auth import AuthError, Credentials, server_credentials
from .activation import activated_listeners
from .handover import HandoverError, adopt_listener, take_state
from .listeners import ListenerError, bind_tcp, bind_unix
from .token_env import take_token_from_environment

log = logging.getLogger("cmuxd.supervisor")


def run_daemon(config) -> int:
    """Take the service manager's sockets or bind our own, then serve until SIGTERM/SIGINT;
    the process exit status."""
    from .daemon import Supervisor

    try:
        adopted = take_state()
    except HandoverError as exc:
        log.error("the supervisor re-executed itself but cannot go on: %s", exc)
        return 1
    if adopted is not None:
        return asyncio.run(Supervisor(config, *adopted_parts(adopted), adopted=adopted).run())
    listeners = []
    try:
        # The token must not reach the workers, the PTY hub or the shells it starts, nor stay
        # readable in our own /proc/<pid>/environ: it is kept for reloads only.
        secret_env = take_token_from_environment()
        creds = None
        activated = activated_listeners(config.launchd_library)
        if activated is not None:
            # The service manager's sockets win: binding the flags' addresses as well would
            # race the socket unit for the same port.
            listeners = activated
            log.info("using %d socket(s) passed by %s; --tcp/--socket addresses are not bound",
                     len(listeners), listeners[0].origin)
            has_tcp = any(listener.kind == "tcp" for listener in listeners)
        else:
            has_tcp = bool(config.tcp)
        if has_tcp or config.unix_auth == "token":
            creds = server_credentials(config.token_file, config.relay_id,
                                       env={**os.environ, **secret_env})
        if activated is None:
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
    if config.allow is not None:
        log.info("TCP peers outside %s are closed before the handshake (--allow-from)",
                 config.allow)
    return asyncio.run(Supervisor(config, listeners, creds, secret_env).run())


def adopted_parts(state: dict) -> tuple[list, Credentials | None, dict]:
    """The listeners, credentials and token variables a previous image of this process
    handed over across exec."""
    row = state["creds"]
    creds = None if row is None else Credentials(
        row["relay_id"], bytes.fromhex(row["token"]), row["source"], row["path"], row["origin"])
    return [adopt_listener(l) for l in state["listeners"]], creds, state["secret_env"]
