"""The worker pool: pre-started worker processes, fd passing, least-loaded dispatch, respawn.

Workers are fresh interpreters (`python -m cmuxd.worker`), not forks of the supervisor, so
they inherit no event loop, listener or token. Each gets one end of an AF_UNIX stream
socketpair; connections reach it over that channel as SCM_RIGHTS. The supervisor never
blocks on a worker: a send that would block is queued and finished when the channel
drains.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque

import orjson

from ..handoff import encode_handoff

log = logging.getLogger("cmuxd.supervisor")

RESPAWN_MIN = 0.1
RESPAWN_MAX = 10.0
STOP_GRACE = 5.0


class Worker:
    def __init__(self, index: int, generation: int):
        self.index = index
        self.generation = generation
        self.proc: subprocess.Popen | None = None
        self.chan: socket.socket | None = None
        self.started = time.time()
        self.load = 0
        self.served = 0
        self.out: deque = deque()  # (bytes, fd or None) not yet sent
        self.inbuf = b""
        self.alive = False

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0


class WorkerPool:
    def __init__(self, config):
        self.config = config
        self.workers: list[Worker] = []
        self.generation = 1
        self.stopping = False
        self._crash_streak = 0
        self._respawn_at: dict[int, float] = {}
        self._tick: asyncio.TimerHandle | None = None
        self.exits = 0

    # lifecycle

    def start(self) -> None:
        for index in range(self.config.workers):
            self.workers.append(self._spawn(index))
        self._schedule_tick()

    def _spawn(self, index: int) -> Worker:
        loop = asyncio.get_running_loop()
        worker = Worker(index, self.generation)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = [
            sys.executable, "-m", "cmuxd.worker",
            "--channel-fd", str(theirs.fileno()),
            "--index", str(index),
            "--config", orjson.dumps(self.config.worker_json()).decode(),
        ]
        worker.proc = subprocess.Popen(
            cmd, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True
        )
        theirs.close()
        ours.setblocking(False)
        worker.chan = ours
        worker.alive = True
        loop.add_reader(ours.fileno(), self._on_readable, worker)
        log.info("worker %d started (pid %d, generation %d)", index, worker.pid,
                 worker.generation)
        return worker

    async def stop(self) -> None:
        """SIGTERM every worker, SIGKILL the ones still there after the grace period."""
        self.stopping = True
        if self._tick is not None:
            self._tick.cancel()
        for worker in self.workers:
            if worker.proc and worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for worker in self.workers:
            while worker.proc and worker.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if worker.proc and worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()
            self._drop_channel(worker)

    # dispatch

    def dispatch(self, conn: socket.socket, kind: str, peer: str, leftover: bytes,
                 conn_id: int) -> Worker:
        live = [w for w in self.workers if w.alive]
        if not live:
            raise RuntimeError("no worker is running")
        worker = min(live, key=lambda w: w.load)
        data = encode_handoff(conn_id, kind, peer, leftover)
        if worker.out:
            worker.out.append((data, os.dup(conn.fileno())))
        else:
            self._send(worker, data, conn.fileno(), owned=False)
        worker.load += 1
        worker.served += 1
        return worker

    def _send(self, worker: Worker, data: bytes, fd: int | None, owned: bool) -> bool:
        """Send one message now; queue what is left of it and return False if it would block.
        The fd travels with the first byte sent, so a partial send keeps only bytes."""
        try:
            if fd is not None:
                sent = socket.send_fds(worker.chan, [data], [fd])
            else:
                sent = worker.chan.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            if owned and fd is not None:
                os.close(fd)
            self._worker_gone(worker)
            return False
        if sent == len(data):
            if owned and fd is not None:
                os.close(fd)
            return True
        if sent > 0:
            if owned and fd is not None:
                os.close(fd)
            fd = None
        elif fd is not None and not owned:
            fd = os.dup(fd)
        worker.out.appendleft((data[sent:], fd))
        asyncio.get_running_loop().add_writer(worker.chan.fileno(), self._flush, worker)
        return False

    def _flush(self, worker: Worker) -> None:
        asyncio.get_running_loop().remove_writer(worker.chan.fileno())
        while worker.out and worker.alive:
            data, fd = worker.out.popleft()
            if not self._send(worker, data, fd, owned=True):
                return

    # reports and exits

    def _on_readable(self, worker: Worker) -> None:
        try:
            data = worker.chan.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._worker_gone(worker)
            return
        buf = worker.inbuf + data
        *lines, worker.inbuf = buf.split(b"\n")
        for line in lines:
            report = orjson.loads(line)
            closed = report.get("closed")
            if closed:
                worker.load = max(0, worker.load - closed)

    def _drop_channel(self, worker: Worker) -> None:
        if worker.chan is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.chan.fileno())
        loop.remove_writer(worker.chan.fileno())
        worker.chan.close()
        worker.chan = None
        while worker.out:
            _, fd = worker.out.popleft()
            if fd is not None:
                os.close(fd)

    def _worker_gone(self, worker: Worker) -> None:
        if not worker.alive:
            return
        worker.alive = False
        self._drop_channel(worker)
        if self.stopping:
            return
        self._schedule_tick(0.0)

    def _schedule_tick(self, delay: float = 0.5) -> None:
        if self._tick is not None:
            self._tick.cancel()
        self._tick = asyncio.get_running_loop().call_later(delay, self._on_tick)

    def _on_tick(self) -> None:
        """Reap exited workers and replace them, backing off when they keep crashing."""
        self._tick = None
        if self.stopping:
            return
        now = time.monotonic()
        for i, worker in enumerate(self.workers):
            if worker.alive and worker.proc.poll() is None:
                continue
            if worker.alive:
                self._worker_gone(worker)
            code = worker.proc.poll()
            if code is None:
                continue  # channel closed but process not yet exited: check again soon
            if i not in self._respawn_at:
                self.exits += 1
                lived = time.time() - worker.started
                self._crash_streak = self._crash_streak + 1 if lived < 5 else 0
                delay = min(RESPAWN_MAX, RESPAWN_MIN * (2 ** max(0, self._crash_streak - 1)))
                self._respawn_at[i] = now + (0 if self._crash_streak <= 1 else delay)
                log.warning("worker %d (pid %d) exited with %s; replacing it", worker.index,
                            worker.pid, _describe_exit(code))
            if now >= self._respawn_at[i]:
                del self._respawn_at[i]
                self.workers[i] = self._spawn(worker.index)
        self._schedule_tick(0.05 if self._respawn_at or any(
            not w.alive for w in self.workers) else 0.5)

    def snapshot(self) -> list[dict]:
        return [
            {"index": w.index, "pid": w.pid, "generation": w.generation, "alive": w.alive,
             "connections": w.load, "served": w.served, "started": w.started}
            for w in self.workers
        ]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
