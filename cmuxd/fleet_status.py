"""`cmuxd-remote fleet status`: check every host of cmux.json at once and print one line each.

Each host gets its own connection and its own deadline, all at the same time, so one host
that is down (a dial that times out) costs the whole check only that deadline, however many
hosts there are. What a remote client may see is what is reported: `hello` (version,
capabilities), the round trip of a `ping`, and `ext.status` (uptime, workers, connections)
where the daemon advertises it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from .client import EXIT_AUTH, EXIT_TIMEOUT, AsyncClient, ClientError, RemoteError, fleet_address
from .fleet import FleetHost
from .handlers.system import STATUS_CAPABILITY
from .status import duration

DEFAULT_TIMEOUT = 5.0


@dataclass
class HostReport:
    name: str
    address: str
    state: str  # up, down, timeout, auth, error
    rtt_ms: float | None = None
    version: str | None = None
    uptime: float | None = None
    workers: int | None = None
    connections: int | None = None
    error: str | None = None

    @property
    def up(self) -> bool:
        return self.state == "up"

    def to_json(self) -> dict:
        return asdict(self)


async def check_host(host: FleetHost, timeout: float = DEFAULT_TIMEOUT) -> HostReport:
    """Connect, authenticate with the host's own credentials, hello, ping, ext.status."""
    address = fleet_address(host)
    shown = str(address).removeprefix("cmux://")
    report = HostReport(host.name, shown, "down")
    client = None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            client = await AsyncClient.connect(address)
            hello = await client.rpc("hello", timeout=None)
            started = loop.time()
            await client.rpc("ping", timeout=None)
            report.rtt_ms = round((loop.time() - started) * 1000, 3)
            report.version = hello.get("version")
            if STATUS_CAPABILITY in (hello.get("capabilities") or ()):
                figures = await client.rpc(STATUS_CAPABILITY, timeout=None)
                report.uptime = figures.get("uptime")
                report.workers = figures.get("workers")
                report.connections = figures.get("connections")
        report.state = "up"
    except (TimeoutError, ClientError, RemoteError, OSError) as exc:
        report.state, report.error = describe_failure(exc, address, timeout)
    finally:
        if client is not None:
            await client.close()
    return report


def describe_failure(exc: Exception, address, timeout: float) -> tuple[str, str]:
    """The state (down, timeout, auth, error) and the reason of a host that did not answer."""
    if isinstance(exc, TimeoutError):
        return "timeout", f"no answer within {timeout:g} s"
    if isinstance(exc, ClientError):
        state = {EXIT_AUTH: "auth", EXIT_TIMEOUT: "timeout"}.get(exc.exit_code, "down")
        return state, str(exc).removeprefix(f"{address}: ")
    if isinstance(exc, RemoteError):
        return "error", f"{exc.code}: {exc.message}"
    return "down", exc.strerror or str(exc)


async def check_fleet(hosts: list[Any], timeout: float = DEFAULT_TIMEOUT, progress=None,
                      check: Callable[[Any, float], Awaitable[Any]] = check_host) -> list[Any]:
    """`check(host, timeout)` for every host at once (anything with a `name`);
    `progress(done, total, waiting_names)` after each answer. Reports come back in the order
    of `hosts`."""
    waiting = {h.name for h in hosts}
    done = 0

    async def one(host) -> Any:
        nonlocal done
        report = await check(host, timeout)
        done += 1
        waiting.discard(host.name)
        if progress is not None:
            progress(done, len(hosts), sorted(waiting))
        return report

    if progress is not None:
        progress(0, len(hosts), sorted(waiting))
    return list(await asyncio.gather(*(one(h) for h in hosts)))


COLUMNS = ("HOST", "ADDRESS", "STATE", "RTT", "VERSION", "UPTIME", "WORKERS", "CONNS")


def _cells(r: HostReport) -> list[str]:
    dash = "-"
    return [
        r.name,
        r.address,
        r.state,
        dash if r.rtt_ms is None else f"{r.rtt_ms:.1f}ms",
        r.version or dash,
        dash if r.uptime is None else duration(r.uptime),
        dash if r.workers is None else str(r.workers),
        dash if r.connections is None else str(r.connections),
    ]


def format_table(reports: list[HostReport]) -> str:
    """One line per host, columns as wide as their widest cell, the reason a host is not up
    at the end of its line, and a count at the bottom: readable at fifty hosts."""
    rows = [list(COLUMNS)] + [_cells(r) for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = []
    for row, report in zip(rows, [None, *reports]):
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths))
        if report is not None and report.error:
            line += "  " + report.error
        lines.append(line.rstrip())
    up = sum(r.up for r in reports)
    summary = f"{len(reports)} host{'s' if len(reports) != 1 else ''}: {up} up"
    if up != len(reports):
        summary += f", {len(reports) - up} not up"
    lines += ["", summary]
    return "\n".join(lines)


def progress_line(done: int, total: int, waiting: list[str], width: int = 100) -> str:
    text = f"checking {total} hosts: {done} answered"
    if waiting:
        text += ", waiting for " + ", ".join(waiting)
    return text if len(text) <= width else text[: width - 1] + "…"

