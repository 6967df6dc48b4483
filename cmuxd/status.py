"""`cmuxd-remote status`: ask the supervisor's control socket, print a table for people."""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from .local_sockets import connect_trusted


def query_status(path: Path, timeout: float = 5.0) -> dict:
    return control_request(path, {"method": "status"}, timeout)


def control_request(path: Path, request: dict, timeout: float = 5.0) -> dict:
    """One request to the running supervisor's control socket; its result. OSError says, in
    a sentence, why there is none. The request may hold a secret: it goes over the socket
    only, and is never part of an error."""
    try:
        sock = connect_trusted(path, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        raise OSError(f"no daemon answers on {path}; is it running (or is its "
                      "--state-dir elsewhere)?") from None
    except PermissionError:
        raise OSError(f"{path} belongs to another user; run this as the daemon's user "
                      "(or root)") from None
    with sock:
        sock.sendall(orjson.dumps(request) + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise OSError(f"the daemon on {path} closed the control socket without answering; "
                      "run this as the daemon's user (or root)")
    reply = orjson.loads(data)
    if not reply.get("ok"):
        raise OSError(f"the daemon refused the {request.get('method')} request: "
                      f"{reply.get('error')}")
    return reply["result"]


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1048576:.1f}M"


def format_status(st: dict) -> str:
    lines = [
        f"cmuxd {st['version']}  pid {st['pid']}  up {duration(st['uptime'])}  "
        f"relay {st.get('relay_id') or '-'}  generation {st.get('generation', 1)}",
        "",
        "LISTENER                                   KIND  ORIGIN",
    ]
    for l in st["listeners"]:
        lines.append(f"{l['address']:<42} {l['kind']:<5} {l['origin']}")
    until = st.get("previous_token_until")
    if until:
        lines += ["", f"the previous relay token is still accepted for new connections until "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(until))} "
                      f"({duration(max(0, until - time.time()))} from now)"]
    lines += ["", "WORKER  PID      GEN  STATE     CONNS  SERVED   RSS      CPU(s)  AGE     VERSION"]
    for w in st["workers"]:
        lines.append(
            f"{w['index']:<7} {w['pid']:<8} {w['generation']:<4} {w['state']:<9} "
            f"{w['connections']:<6} {w['served']:<8} {_mib(w.get('rss')):<8} "
            f"{w.get('cpu', '-'):<7} {duration(w['age']):<7} {w.get('version') or '-'}"
        )
    hub = st.get("hub")
    if hub:
        state = "connected" if hub.get("connected") else "not connected"
        lines += ["", f"PTY hub: pid {hub.get('pid') or '-'}, {hub.get('version') or '-'}, "
                      f"{hub.get('sessions', 0)} session(s), {state}"]
    devices = st.get("device_connections") or {}
    if devices:
        lines += ["", "DEVICE                          CONNS"]
        for name in sorted(devices):
            lines.append(f"{name:<31} {devices[name]}")
    counters = st.get("counters", {})
    lines += ["", "COUNTERS"]
    for key in sorted(counters):
        lines.append(f"  {key:<28} {counters[key]}")
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """An age for a table: 45s, 12m, 3h07m, 5d."""
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d"
