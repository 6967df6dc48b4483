"""A worker process: receives authenticated connections from the supervisor and serves them.

Started by the supervisor's pool as `python -m cmuxd.worker`; never run by hand. Each
connection received over the channel runs the same connection loop as `serve --stdio`.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import resource
import signal
import socket
from collections import deque

import orjson

from .connection import Connection
from .handlers.system import DaemonFigures
from . import __version__
from .front_door import serve_front
from .handoff import HandoffDecoder, encode_report
from .hub_link import RemoteHub, hub_socket_path
from .link_channel import receive_fds
from .logs import setup_logging
from .memory import return_large_blocks

log = logging.getLogger("cmuxd.worker")

MAX_FDS_PER_READ = 64
FD_WARNING_INTERVAL = 10.0
FD_LIMIT_CAP = 1 << 20


class WorkerProcess:
    def __init__(self, channel_fd: int, index: int, config: dict):
        self.index = index
        self.config = config
        self.chan = socket.socket(fileno=channel_fd)
        self.chan.setblocking(False)
        self.decoder = HandoffDecoder()
        self.fds: deque[int] = deque()
        self.connections: set[Connection] = set()
        self.closed_since_report = 0
        self.report_pending = False
        self._out = bytearray()
        self._flushing = False
        self.hub = RemoteHub(hub_socket_path(config["state_dir"]),
                             cli_bridge=config.get("cli_bridge", True)) \
            if config.get("state_dir") else None
        self.stopped: asyncio.Future | None = None
        self.figures = DaemonFigures(self.connections)
        self.figures.update(config.get("daemon"))
        self._fd_warned = float("-inf")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.stopped = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        loop.add_reader(self.chan.fileno(), self._on_channel)
        if self.hub is not None:
            self.hub.start()
        self._send(encode_report(ready=True, version=__version__))  # READY=1 may be told
        await self.stopped
        for conn in list(self.connections):
            conn.connection_lost(None)
        await asyncio.sleep(0)

    def stop(self) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)

    def _on_channel(self) -> None:
        got = receive_fds(self.chan, 262144, MAX_FDS_PER_READ)
        if got is None:
            return
        data, fds, truncated = got
        self.fds.extend(fds)
        if truncated:
            self._warn_fd_limit()
        if not data:
            # The supervisor is gone: nobody can hand us work or supervise us any more.
            asyncio.get_running_loop().remove_reader(self.chan.fileno())
            self.stop()
            return
        got, lost = [], []
        for header, leftover in self.decoder.feed(data):
            kind = header.get("t")
            if kind is None and not self.fds:
                # The kernel could not give us its fd (we are at our fd limit): the
                # supervisor closes its copy, so the client sees the connection end.
                lost.append(header["id"])
            elif kind is None:
                got.append(header["id"])
                self._serve(self.fds.popleft(), header, leftover)
            elif kind == "ping":
                self.figures.update(header.get("daemon"))
                self._send(encode_report(pong=header["seq"], connections=len(self.connections),
                                         devices=self._device_counts()))
            elif kind == "close_device":
                self._close_device(header["device"])
            elif kind == "retire":
                asyncio.get_running_loop().create_task(self.retire(header["grace"]))
        if got or lost:
            self._send(encode_report(got=got, lost=lost))

    def _warn_fd_limit(self) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._fd_warned >= FD_WARNING_INTERVAL:
            self._fd_warned = now
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            log.warning("worker %d is out of file descriptors (limit %d): connections handed "
                        "to it are closed; raise the limit (LimitNOFILE=, ulimit -n) or lower "
                        "--max-connections", self.index, soft)

    async def retire(self, grace: float) -> None:
        """Serve the open connections until they close or `grace` seconds pass (a negative
        grace: until they close, as after an upgrade), then close what is left at a frame
        boundary and exit: a reload drops no request in flight."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace if grace >= 0 else float("inf")
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.finish()
        while self.connections and loop.time() < deadline + 5:
            await asyncio.sleep(0.02)
        self.stop()

    def _device_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for conn in self.connections:
            if conn.ctx.device is not None:
                counts[conn.ctx.device] = counts.get(conn.ctx.device, 0) + 1
        return counts

    def _close_device(self, name: str) -> None:
        """The device was revoked: its connections end now, not at their next request.
        Its PTY sessions go on; they belong to the user, not to the connection."""
        for conn in list(self.connections):
            if conn.ctx.device == name:
                conn.abort()

    def _serve(self, fd: int, header: dict, leftover: bytes) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(fileno=fd)
        if header["kind"] == "front":
            sock.setblocking(False)
            loop.create_task(self._serve_front(sock))
            return
        device = header.get("device")
        conn = Connection(header["kind"], self.hub, initial=leftover, daemon=self.figures,
                          caller=caller_of(header), device=device)
        self.connections.add(conn)
        conn.done.add_done_callback(lambda _: self._closed(conn))
        if device is not None:
            log.info("device %s connected from %s", device, header["peer"],
                     extra={"DEVICE": device})
        loop.create_task(loop.connect_accepted_socket(lambda: conn, sock))

    async def _serve_front(self, sock: socket.socket) -> None:
        """A `serve --stdio` front door: its stdin and stdout are the connection."""

        def make_connection(env: dict) -> Connection:
            conn = Connection("front", self.hub, daemon=self.figures, env=env,
                              caller=f"uid {os.getuid()}")
            self.connections.add(conn)
            return conn

        conn = await serve_front(sock, make_connection)
        if conn is None:
            self._count_closed()
        else:
            self._closed(conn)

    def _closed(self, conn: Connection) -> None:
        if conn.ctx.device is not None:
            log.info("device %s disconnected", conn.ctx.device,
                     extra={"DEVICE": conn.ctx.device})
        self.connections.discard(conn)
        self._count_closed()

    def _count_closed(self) -> None:
        self.closed_since_report += 1
        if not self.report_pending:
            self.report_pending = True
            asyncio.get_running_loop().call_soon(self._report)

    def _report(self) -> None:
        self.report_pending = False
        self._send(encode_report(closed=self.closed_since_report,
                                 connections=len(self.connections)))
        self.closed_since_report = 0

    def _send(self, report: bytes) -> None:
        """Queue a report line; it goes out whole and in order even when the channel is
        momentarily full, since the supervisor acts on every one (fd receipts, closes)."""
        self._out += report
        self._flush()

    def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            sent = self.chan.send(self._out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = len(self._out)  # the supervisor is gone; the channel's EOF stops us
        del self._out[:sent]
        if self._out and not self._flushing:
            self._flushing = True
            loop.add_writer(self.chan.fileno(), self._flush)
        elif not self._out and self._flushing:
            self._flushing = False
            loop.remove_writer(self.chan.fileno())


def caller_of(header: dict) -> str:
    """Who is on the other end, as ext.status and the log say it."""
    if header.get("device"):
        return f"device {header['device']}"
    return "shared token" if header["kind"] == "tcp" else header["peer"]


def raise_fd_limit() -> None:
    """Every connection and proxied socket is an fd, and a soft limit of 1024 (the usual
    default outside the units) would cap a worker far below --max-connections. Only workers
    raise it: they start no processes, so the PTY shells keep the limit they were given."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_LIMIT_CAP if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_CAP)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cmuxd.worker")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--config", default="{}")
    args = parser.parse_args(argv)
    setup_logging(f"cmuxd worker {args.index} [{os.getpid()}]")
    # A worker found hung gets SIGABRT before SIGKILL: its traceback then reaches the log.
    faulthandler.enable()
    raise_fd_limit()
    return_large_blocks()
    worker = WorkerProcess(args.channel_fd, args.index, orjson.loads(args.config))
    asyncio.run(worker.run())


if __name__ == "__main__":
    main()
