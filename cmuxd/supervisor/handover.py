"""What the supervisor hands to its next image when it re-executes itself in place.

An upgrade reload execs the code now installed in this same process: same pid (so the
service manager's MAINPID, the workers' parent and the listening sockets all stay), new code.
The fds to keep (listeners, the control and front door sockets, each worker's channel and the
connections not yet confirmed by a worker) are made inheritable; the rest of the state (counts,
generations, the relay token and the one a rotation replaced) goes as JSON in a memfd, named by
its fd number in CMUXD_HANDOVER_FD. The token is in neither argv nor the environment: the memfd
is readable only through this process's fd table.

The state says its format; a supervisor adopts only formats it knows, and the pre-flight asks
the new code (`python -m cmuxd.supervisor.handover`, the state on stdin with its secrets
replaced) whether it would adopt this one before anything execs.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import orjson

from .listeners import Listener

FORMAT = 1
"""The layout of the state below; a change that an older image could misread bumps it."""
FORMATS_KNOWN = (1,)
FD_ENV = "CMUXD_HANDOVER_FD"
REDACTED = "00" * 32
"""Stands in for every token in the copy of the state the pre-flight checks."""
KEEP_SIGNALS = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
"""Signals that would end the process between exec and the new image's handlers: ignored
across exec (an ignored disposition is inherited), handled again once it runs."""


class HandoverError(Exception):
    """The state cannot be adopted; the message names the field, never its value."""


_LISTENER = {"fd": int, "kind": str, "address": str, "origin": str, "path": (str, None),
             "name": str, "inode": (list, None)}
_WORKER = {"index": int, "generation": int, "pid": int, "chan": (int, None),
           "started": float, "state": str, "retire_reason": str, "load": int, "served": int,
           "serve_limit": int, "ready": bool, "version": str, "ping_seq": int,
           "devices": dict, "inbuf": str, "out": list, "unacked": list}
_STATE = {"format": int, "version": str, "listeners": list, "front": dict, "control": dict,
          "creds": (dict, None), "secret_env": dict, "rotation": dict, "counters": dict,
          "started": float, "next_id": int, "notify": dict, "pool": dict, "hub": dict,
          "last_used": dict}
_CREDS = {"relay_id": str, "token": str, "source": str, "path": (str, None), "origin": str}
_ROTATION = {"replaced_token": (str, None), "previous": (str, None),
             "previous_for": (float, None), "previous_until": (float, None)}
_POOL = {"generation": int, "workers_wanted": int, "crash_streak": int, "workers": list}
_HUB = {"pid": (int, None), "spawned_at": float, "streak": int, "upgrading": bool}


def _check(obj, schema: dict, where: str) -> None:
    if type(obj) is not dict:
        raise HandoverError(f"{where} is not an object")
    for key, kinds in schema.items():
        if key not in obj:
            raise HandoverError(f"{where}.{key} is missing")
        kinds = kinds if type(kinds) is tuple else (kinds,)
        value = obj[key]
        ok = any(value is None if kind is None else
                 (type(value) in (int, float) if kind is float else type(value) is kind)
                 for kind in kinds)
        if not ok:
            raise HandoverError(f"{where}.{key} has the wrong type")


def check_state(state) -> None:
    """Raise HandoverError unless this code can adopt `state` (fds are not looked at: the
    pre-flight checks a copy in another process)."""
    if type(state) is not dict or type(state.get("format")) is not int:
        raise HandoverError("the state has no format number")
    if state["format"] not in FORMATS_KNOWN:
        raise HandoverError(f"the state is in format {state['format']}, this code adopts "
                            f"{', '.join(map(str, FORMATS_KNOWN))}")
    _check(state, _STATE, "state")
    for i, listener in enumerate(state["listeners"]):
        _check(listener, _LISTENER, f"state.listeners[{i}]")
    _check(state["front"], _LISTENER, "state.front")
    _check(state["control"], _LISTENER, "state.control")
    if state["creds"] is not None:
        _check(state["creds"], _CREDS, "state.creds")
    _check(state["rotation"], _ROTATION, "state.rotation")
    _check(state["pool"], _POOL, "state.pool")
    _check(state["hub"], _HUB, "state.hub")
    for i, worker in enumerate(state["pool"]["workers"]):
        _check(worker, _WORKER, f"state.pool.workers[{i}]")
        for entry in worker["out"]:
            if (type(entry) is not list or len(entry) != 2 or type(entry[0]) is not str
                    or type(entry[1]) not in (int, type(None))):
                raise HandoverError(f"state.pool.workers[{i}].out has a malformed entry")
        for entry in worker["unacked"]:
            if (type(entry) is not list or len(entry) != 3 or type(entry[0]) is not int
                    or type(entry[1]) is not int or type(entry[2]) is not str):
                raise HandoverError(f"state.pool.workers[{i}].unacked has a malformed entry")
    tokens = [("state.creds.token", state["creds"]["token"] if state["creds"] else None),
              ("state.rotation.replaced_token", state["rotation"]["replaced_token"]),
              ("state.rotation.previous", state["rotation"]["previous"])]
    for where, token in tokens:
        if token is not None and not _is_hex(token):
            raise HandoverError(f"{where} is not a hex token")
    for name, value in state["secret_env"].items():
        if type(value) is not str:
            raise HandoverError(f"state.secret_env.{name} has the wrong type")


def _is_hex(text: str) -> bool:
    try:
        return bool(bytes.fromhex(text))
    except ValueError:
        return False


def listener_state(listener: Listener, fd: int | None = None) -> dict:
    """A listener as the next image rebuilds it; `fd` when it is not the listener's own."""
    return {"fd": listener.sock.fileno() if fd is None else fd, "kind": listener.kind,
            "address": listener.address, "origin": listener.origin,
            "path": str(listener.path) if listener.path is not None else None,
            "name": listener.name,
            "inode": list(listener.inode) if listener.inode is not None else None}


def adopt_listener(row: dict) -> Listener:
    sock = socket.socket(fileno=row["fd"])
    os.set_inheritable(sock.fileno(), False)
    sock.setblocking(False)
    return Listener(sock, row["kind"], row["address"], row["origin"],
                    Path(row["path"]) if row["path"] is not None else None, row["name"],
                    tuple(row["inode"]) if row["inode"] is not None else None)


def redacted(state: dict) -> dict:
    """The state with every secret replaced, for the pre-flight to check."""
    copy = orjson.loads(orjson.dumps(state))
    if copy["creds"] is not None:
        copy["creds"]["token"] = REDACTED
    for key in ("replaced_token", "previous"):
        if copy["rotation"][key] is not None:
            copy["rotation"][key] = REDACTED
    copy["secret_env"] = {name: REDACTED for name in copy["secret_env"]}
    return copy


def write_state(state: dict) -> int:
    """The state in an inheritable memfd, read from its start by the next image."""
    fd = os.memfd_create("cmuxd-handover", 0)
    try:
        data = orjson.dumps(state)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        os.set_inheritable(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def take_state(environ=os.environ) -> dict | None:
    """The state handed over by the previous image of this process, or None after a plain
    start. The variable leaves the environment at once, so no child inherits it."""
    text = environ.pop(FD_ENV, None)
    if text is None:
        return None
    try:
        fd = int(text)
        with os.fdopen(fd, "rb") as memfd:
            state = orjson.loads(memfd.read())
    except (ValueError, OSError, orjson.JSONDecodeError):
        raise HandoverError(f"{FD_ENV} does not name a readable handover state") from None
    check_state(state)
    return state


def reexec(state_fd: int, environ=os.environ) -> None:
    """Replace this process's image with the code installed now, with the same command
    line. Returns only when exec failed (OSError); the caller goes on with the old code."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in KEEP_SIGNALS}
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
                  {**environ, FD_ENV: str(state_fd)})
    except OSError:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise


def main() -> int:
    """The pre-flight's check, run with the new code: exit 0 if it adopts the (redacted)
    state on stdin, else one line on stderr saying why."""
    try:
        check_state(orjson.loads(sys.stdin.buffer.read()))
    except orjson.JSONDecodeError:
        print("the handover state is not JSON", file=sys.stderr)
        return 1
    except HandoverError as exc:
        print(f"cannot adopt the supervisor's state: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
