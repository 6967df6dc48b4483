"""`cmuxd-remote status`: ask the supervisor's control socket, print a table for people."""

from __future__ import annotations

from pathlib import Path

import orjson

from .local_sockets import connect_trusted


def query_status(path: Path, timeout: float = 5.0) -> dict:
    try:
        sock = connect_trusted(path, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        raise OSError(f"no daemon answers on {path}; is it running (or is its "
                      "--state-dir elsewhere)?") from None
    with sock:
        sock.sendall(b'{"method":"status"}\n')
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = orjson.loads(data)
    if not reply.get("ok"):
        raise OSError(f"the daemon refused the status request: {reply.get('error')}")
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
    lines += ["", "WORKER  PID      GEN  STATE     CONNS  SERVED   RSS      CPU(s)  AGE"]
    for w in st["workers"]:
        lines.append(
            f"{w['index']:<7} {w['pid']:<8} {w['generation']:<4} {w['state']:<9} "
            f"{w['connections']:<6} {w['served']:<8} {_mib(w.get('rss')):<8} "
            f"{w.get('cpu', '-'):<7} {duration(w['age'])}"
        )
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
