"""`cmuxd-remote sessions` and `kill`: the PTY sessions of several hosts at once, and ending one.

Hosts are asked concurrently, each with its own deadline, as `fleet status` does. pty.list is
called with `ext_command` and `ext_idle_s` (spec §6.8), so a daemon of ours says what each
session runs and how long it has been quiet; an upstream daemon ignores them, and those
columns show `-`. What a daemon reports is shown with control characters escaped: a session
name or command is whatever someone with the token chose, and must not drive the terminal
of the person reading the table.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field

from .client import Address, AsyncClient, ClientError, RemoteError
from .fleet_status import DEFAULT_TIMEOUT, describe_failure
from .status import duration

LIST_PARAMS = {"ext_command": True, "ext_idle_s": True}
COMMAND_WIDTH = 40


@dataclass
class Target:
    name: str
    address: Address


@dataclass
class HostSessions:
    name: str
    address: str
    state: str  # up, down, timeout, auth, error
    error: str | None = None
    sessions: list[dict] = field(default_factory=list)

    @property
    def up(self) -> bool:
        return self.state == "up"

    def to_json(self) -> dict:
        return asdict(self)


async def list_host(target: Target, timeout: float = DEFAULT_TIMEOUT,
                    remote_command: str | None = None) -> HostSessions:
    report = HostSessions(target.name, str(target.address), "down")
    client = None
    try:
        async with asyncio.timeout(timeout):
            client = await AsyncClient.connect(target.address, remote_command=remote_command)
            result = await client.rpc("pty.list", LIST_PARAMS, timeout=None)
        sessions = result.get("sessions")
        if isinstance(sessions, list):
            report.sessions = [s for s in sessions if isinstance(s, dict)]
        report.state = "up"
    except (TimeoutError, ClientError, RemoteError, OSError) as exc:
        report.state, report.error = describe_failure(exc, target.address, timeout)
    finally:
        if client is not None:
            await client.close()
    return report


def printable(text) -> str:
    """`text` with every control character shown as an escape, never sent to the terminal."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _bytes(n) -> str:
    if not isinstance(n, int):
        return "-"
    if n < 1024:
        return f"{n}B"
    if n < 1 << 20:
        return f"{n / 1024:.1f}K"
    return f"{n / 1048576:.1f}M"


COLUMNS = ("HOST", "SESSION", "COMMAND", "SIZE", "ATTACHED", "IDLE", "SCROLLBACK")


def _cells(host: str, s: dict) -> list[str]:
    command = printable(s.get("ext_command", "-"))
    if len(command) > COMMAND_WIDTH:
        command = command[: COMMAND_WIDTH - 1] + "…"
    cols, rows = s.get("effective_cols"), s.get("effective_rows")
    idle = s.get("ext_idle_s")
    attachments = s.get("attachments")
    return [
        printable(host),
        printable(s.get("session_id", "?")),
        command,
        f"{cols}x{rows}" if isinstance(cols, int) and isinstance(rows, int) else "-",
        str(len(attachments)) if isinstance(attachments, list) else "-",
        duration(idle) if isinstance(idle, (int, float)) else "-",
        _bytes(s.get("scrollback_bytes")),
    ]


def format_table(reports: list[HostSessions]) -> str:
    """One line per session, then one per host that did not answer, and a count."""
    rows = [list(COLUMNS)] + [_cells(r.name, s) for r in reports for s in r.sessions]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    for r in reports:
        if not r.up:
            lines.append(f"{printable(r.name)}: {r.state}: {printable(r.error)}")
    count = sum(len(r.sessions) for r in reports)
    up = sum(r.up for r in reports)
    summary = (f"{count} session{'s' if count != 1 else ''} on {up} "
               f"host{'s' if up != 1 else ''}")
    if up != len(reports):
        missed = len(reports) - up
        summary += f"; {missed} host{'s' if missed != 1 else ''} not reached"
    return "\n".join(lines + ["", summary])
