"""The worker pool: pre-started worker processes, fd passing, least-loaded dispatch,
heartbeats, respawn, graceful retirement (reload, recycling, scaling down).

One `Worker` per child process holds its process, its channel, the fds in flight to it and
its liveness. `_reconcile()` is the only place that starts workers: it compares the workers
wanted (one serving worker per index below --workers, of the current generation) with the
ones serving, so reload, scaling, recycling and a crash only retire or forget workers and
then reconcile. A worker's exit is an event (its pidfd), not something a timer looks for.

Workers are fresh interpreters (`python -m cmuxd.worker`), not forks of the supervisor, so
they inherit no event loop, listener or token. Each gets one end of an AF_UNIX stream
socketpair; connections reach it over that channel as SCM_RIGHTS, with heartbeats and
retire orders on the same channel. The supervisor never blocks on a worker: a send that
would block is queued and finished when the channel drains.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, deque

import orjson
import psutil

from ..handoff import encode_control, encode_handoff
from ..protocol import OVERSIZED, FrameDecoder
from .child import Child

log = logging.getLogger("cmuxd.supervisor")

HEARTBEAT_INTERVAL = 1.0
RECYCLE_CHECK_INTERVAL = 5.0
RESPAWN_MAX = 10.0
STOP_GRACE = 5.0
UNTIL_CLOSED = -1
"""A retirement grace that lasts until the worker's connections close."""
MAX_REPORT = 1 << 20
"""A worker's report line is a few numbers and device names: far below this."""
FDS_PER_SEND = 64
"""Connections handed over in one message at most: what a worker takes per read
(cmuxd.worker.MAX_FDS_PER_READ); fds past that would be lost with MSG_CTRUNC."""


CHILD_CWD = "/"
"""Children run from the root directory, never from wherever the daemon was started."""


def child_command(module: str, *args: str) -> list[str]:
    """`python -P -m module`: -P keeps the current directory off sys.path, so a module
    planted where the daemon was started (or a stale checkout there) is never imported.
    Not -I, which would also drop user site-packages and the PYTHON* variables that some
    installations need."""
    return [sys.executable, "-P", "-m", module, *args]


class Worker:
    def __init__(self, index: int, generation: int):
        self.index = index
        self.generation = generation
        self.proc: Child | None = None
        self.ps: psutil.Process | None = None
        self.chan: socket.socket | None = None
        self.started = time.time()
        self.state = "serving"  # serving, retiring, gone
        self.retire_reason = ""
        self.load = 0
        self.served = 0
        self.out: deque = deque()  # (bytes, fd or None) not yet sent
        self.batch: list = []  # (bytes, borrowed fd or None) to send at the end of this pass
        self.unacked: dict[int, tuple[int, bytes]] = {}  # conn id -> (our dup of fd, message)
        self.reports = FrameDecoder(MAX_REPORT)  # the worker's report lines
        self.last_pong = time.monotonic()
        self.ready = False  # set by the worker's first report
        self.version = ""  # the code it runs, as it reported
        self.ping_seq = 0
        self.serve_limit = 0
        self.devices: dict[str, int] = {}  # device name -> open connections, as last reported

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    @property
    def alive(self) -> bool:
        """Its process runs and its channel is open: it can be given a connection."""
        return self.chan is not None and self.proc.poll() is None

    def answering(self, now: float, timeout: float) -> bool:
        """Alive, and its loop answered a heartbeat within `timeout` seconds."""
        return self.alive and now - self.last_pong <= timeout


class NoWorkerError(RuntimeError):
    """Every worker is gone (being restarted): a connection has nowhere to go now."""


class WorkerPool:
    def __init__(self, config, on_change=None, counters: Counter | None = None):
        self.config = config
        self.counters = Counter() if counters is None else counters
        self.workers: list[Worker] = []
        self.generation = 1
        self.stopping = False
        self.on_change = on_change or (lambda: None)
        self._crash_streak = 0
        self._respawn_after = 0.0
        self._respawn_timer: asyncio.TimerHandle | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._last_recycle_check = time.monotonic()
        self.started = time.time()

    # lifecycle

    def start(self) -> None:
        self._reconcile()
        self._tick = asyncio.get_running_loop().call_later(HEARTBEAT_INTERVAL, self._on_tick)

    def _reconcile(self) -> None:
        """Start the workers wanted and not serving, retire serving ones past --workers;
        after quick deaths in a row, only once the back-off has passed."""
        if self.stopping:
            return
        running = [w for w in self.serving() if w.proc.poll() is None]
        for worker in running:
            if worker.index >= self.config.workers:
                self.retire(worker, "scaled down")
        missing = sorted(set(range(self.config.workers)) - {w.index for w in running})
        if not missing:
            return
        wait = self._respawn_after - time.monotonic()
        if wait > 0:
            # A crashed worker stays listed (not alive) until then: `status` shows the gap.
            if self._respawn_timer is None:
                self._respawn_timer = asyncio.get_running_loop().call_later(
                    wait, self._respawn_due)
            return
        for worker in self.serving():
            if worker not in running:
                worker.state = "gone"
                self.workers.remove(worker)
        for index in missing:
            self.workers.append(self._spawn(index))
        self.on_change()

    def _respawn_due(self) -> None:
        self._respawn_timer = None
        self._reconcile()

    async def wait_ready(self, timeout: float = 10.0) -> bool:
        """Until every serving worker has reported in, so READY=1 means it."""
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in self.serving()):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def serving(self) -> list[Worker]:
        return [w for w in self.workers if w.state == "serving"]

    def has_worker(self) -> bool:
        return any(w.alive for w in self.serving())

    def _spawn(self, index: int) -> Worker:
        loop = asyncio.get_running_loop()
        worker = Worker(index, self.generation)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = child_command(
            "cmuxd.worker",
            "--channel-fd", str(theirs.fileno()),
            "--index", str(index),
            "--config", orjson.dumps(dict(self.config.worker_json(),
                                          daemon=self.figures())).decode(),
        )
        worker.proc = Child.start(
            cmd, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True,
            cwd=CHILD_CWD,
        )
        theirs.close()
        max_served = self.config.max_connections_served
        if max_served:
            worker.serve_limit = max_served + random.randint(0, max(1, max_served // 10))
        self._watch(worker, ours)
        worker.proc.watch(lambda _: self._exited(worker))
        log.info("worker %d started (pid %d, generation %d)", index, worker.pid,
                 worker.generation)
        return worker

    def _watch(self, worker: Worker, chan: socket.socket) -> None:
        try:
            worker.ps = psutil.Process(worker.pid)
        except psutil.Error:
            worker.ps = None
        chan.setblocking(False)
        worker.chan = chan
        asyncio.get_running_loop().add_reader(chan.fileno(), self._on_readable, worker)

    def state(self) -> dict:
        """Everything the next image of this process needs to go on with the workers it
        inherits (they stay its children across exec): each one's channel fd, counts, and what
        was not yet sent to it or confirmed by it, fds included."""
        rows = []
        for worker in self.workers:
            if worker.state == "gone" or worker.proc.returncode is not None:
                continue  # crashed, waiting for its replacement: the next image starts one
            rows.append({
                "index": worker.index, "generation": worker.generation, "pid": worker.pid,
                "chan": worker.chan.fileno() if worker.chan else None,
                "started": worker.started, "state": worker.state,
                "retire_reason": worker.retire_reason, "load": worker.load,
                "served": worker.served, "serve_limit": worker.serve_limit,
                "ready": worker.ready, "version": worker.version, "ping_seq": worker.ping_seq,
                "devices": worker.devices, "inbuf": _b64(worker.reports.held()),
                "out": [[_b64(data), fd] for data, fd in worker.out],
                "unacked": [[conn_id, fd, _b64(data)]
                            for conn_id, (fd, data) in worker.unacked.items()],
            })
        return {"generation": self.generation, "workers_wanted": self.config.workers,
                "crash_streak": self._crash_streak, "workers": rows}

    def handover(self) -> dict:
        """state(), once everything queued is sent and with every fd it names inheritable;
        a handover that does not end in exec is undone by resume()."""
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for worker in self.workers:
            if worker.batch:
                self._send_batch(worker)
            worker.proc.forget()
        for fd in self._fds():
            os.set_inheritable(fd, True)
        return self.state()

    def _fds(self) -> list[int]:
        fds = []
        for worker in self.workers:
            if worker.state == "gone":
                continue
            if worker.chan is not None:
                fds.append(worker.chan.fileno())
            fds.extend(fd for _, fd in worker.out if fd is not None)
            fds.extend(fd for fd, _ in worker.unacked.values())
        return fds

    def adopt(self, state: dict) -> None:
        """Go on with the workers a previous image of this process handed over; then tick
        as start() does."""
        self.generation = state["generation"]
        self.config.workers = state["workers_wanted"]
        self._crash_streak = state["crash_streak"]
        for row in state["workers"]:
            worker = Worker(row["index"], row["generation"])
            worker.proc = Child(row["pid"])
            for name in ("started", "state", "retire_reason", "load", "served", "serve_limit",
                         "ready", "version", "ping_seq", "devices"):
                setattr(worker, name, row[name])
            worker.reports.feed(base64.b64decode(row["inbuf"]))
            worker.out.extend((base64.b64decode(data), fd) for data, fd in row["out"])
            worker.unacked = {conn_id: (fd, base64.b64decode(data))
                              for conn_id, fd, data in row["unacked"]}
            self.workers.append(worker)
            if row["chan"] is not None:
                self._watch(worker, socket.socket(fileno=row["chan"]))
                if worker.out:
                    asyncio.get_running_loop().add_writer(worker.chan.fileno(), self._flush,
                                                          worker)
        for fd in self._fds():
            os.set_inheritable(fd, False)  # no child started from now on may inherit one
            worker.proc.watch(lambda _, worker=worker: self._exited(worker))
        self._tick = asyncio.get_running_loop().call_later(HEARTBEAT_INTERVAL, self._on_tick)

    def resume(self) -> None:
        """The exec after handover() failed: this image goes on as it was."""
        for fd in self._fds():
            os.set_inheritable(fd, False)
        for worker in self.workers:
            worker.proc.watch(lambda _, worker=worker: self._exited(worker))
        if self._tick is None:
            self._tick = asyncio.get_running_loop().call_later(HEARTBEAT_INTERVAL,
                                                               self._on_tick)

    def reload(self, upgrade: bool = False) -> None:
        """A new generation takes every new connection; the old one drains and exits. After
        an upgrade the old generation serves its connections until they close, however long:
        `status` shows which workers still run the old code."""
        self.generation += 1
        for worker in self.serving():
            if upgrade:
                self.retire(worker, "upgrade", grace=UNTIL_CLOSED)
            else:
                self.retire(worker, "reload")
        self._respawn_after = 0.0
        self._reconcile()

    def scale(self, delta: int) -> None:
        """SIGTTIN/SIGTTOU: one worker more or fewer."""
        if self.stopping:
            return
        target = max(1, self.config.workers + delta)
        if target == self.config.workers:
            return
        self.config.workers = target
        log.info("now %d workers", target)
        self._reconcile()
        self.on_change()

    def retire(self, worker: Worker, reason: str, grace: float | None = None) -> None:
        """Stop giving the worker connections; it serves its open ones until they close or
        the grace period (--graceful-timeout by default) passes, then exits by itself."""
        if worker.state != "serving":
            return
        if worker.proc.poll() is not None:  # crashed already: nothing left to retire
            worker.state = "gone"
            self.workers.remove(worker)
            return
        worker.state = "retiring"
        worker.retire_reason = reason
        if grace is None:
            grace = self.config.graceful_timeout
        log.info("retiring worker %d (pid %d): %s", worker.index, worker.pid, reason)
        self._queue(worker, encode_control("retire", grace=grace), None)

    async def stop(self, graceful: bool = True) -> None:
        """Graceful: every worker answers the requests it has read, closes its connections
        and exits. Otherwise SIGTERM. Stragglers get SIGKILL."""
        self.stopping = True
        if self._tick is not None:
            self._tick.cancel()
        if self._respawn_timer is not None:
            self._respawn_timer.cancel()
        for worker in list(self.workers):
            if worker.proc.poll() is not None:
                continue
            if graceful and worker.chan is not None:
                worker.state = "serving"
                self.retire(worker, "stopping", grace=0)
            else:
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for worker in list(self.workers):
            while worker.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()
            self._drop_channel(worker)

    # dispatch

    def dispatch(self, conn: socket.socket, kind: str, peer: str, leftover: bytes,
                 conn_id: int, device: str | None = None) -> Worker:
        """Hand the connection to the least-loaded serving worker; a worker found dead on the
        way is skipped, so a crash never costs a connection that was not yet its own."""
        return self._dispatch(conn_id, encode_handoff(conn_id, kind, peer, leftover, device),
                              conn.fileno())

    def close_device(self, name: str) -> None:
        """A revoked device: every worker closes the connections it authenticated."""
        for worker in self.workers:
            self._queue(worker, encode_control("close_device", device=name), None)

    def _dispatch(self, conn_id: int, data: bytes, fd: int) -> Worker:
        """Until the worker confirms it took the fd, we keep a copy: if it dies first (also
        before the message went out), the connection goes to another worker instead of being
        lost with it."""
        live = [w for w in self.serving() if w.alive]
        if not live:
            raise NoWorkerError("no worker is running")
        worker = min(live, key=lambda w: w.load)
        copy = os.dup(fd)
        worker.unacked[conn_id] = (copy, data)
        self._queue(worker, data, copy)
        worker.load += 1
        worker.served += 1
        if worker.serve_limit and worker.served >= worker.serve_limit:
            self._replace(worker, f"served {worker.served} connections")
        return worker

    def total_load(self) -> int:
        return sum(w.load for w in self.workers if w.state != "gone")

    def _queue(self, worker: Worker, data: bytes, fd: int | None) -> None:
        """Send at the end of this pass of the loop, with whatever else is queued for the
        worker by then: connections authenticated together go in one message (one wake-up of
        the worker, one confirmation). `fd` must stay open until then."""
        if worker.chan is None:
            return
        if not worker.batch:
            asyncio.get_running_loop().call_soon(self._send_batch, worker)
        worker.batch.append((data, fd))

    def _send_batch(self, worker: Worker) -> None:
        batch, worker.batch = worker.batch, []
        done = 0
        while done < len(batch) and worker.chan is not None and not worker.out:
            fds, end = [], done
            while end < len(batch) and len(fds) < FDS_PER_SEND:
                if batch[end][1] is not None:
                    fds.append(batch[end][1])
                end += 1
            data = b"".join([entry[0] for entry in batch[done:end]])
            try:
                sent = socket.send_fds(worker.chan, [data], fds) if fds else worker.chan.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._worker_gone(worker)
                return
            if sent == 0:
                break
            done = end
            if sent < len(data):
                # The fds went with the first byte; the rest of the bytes wait.
                worker.out.append((data[sent:], None))
        if worker.chan is None:
            return
        # What could not be sent waits, in order, for the channel to drain.
        for data, fd in batch[done:]:
            worker.out.append((data, os.dup(fd) if fd is not None else None))
        if worker.out:
            asyncio.get_running_loop().add_writer(worker.chan.fileno(), self._flush, worker)

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
        while worker.out and worker.chan is not None:
            data, fd = worker.out.popleft()
            if not self._send(worker, data, fd, owned=True):
                return

    # reports, heartbeats and exits

    def _on_readable(self, worker: Worker) -> None:
        if not self._read_reports(worker):
            self._worker_gone(worker)

    def _read_reports(self, worker: Worker) -> bool:
        """Act on what the worker has written; False once its channel is closed."""
        try:
            data = worker.chan.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            return False
        worker.last_pong = time.monotonic()
        worker.ready = True
        for line in worker.reports.feed(data):
            if line is OVERSIZED:
                continue
            report = orjson.loads(line)
            if "version" in report:
                worker.version = str(report["version"])
            for conn_id in report.get("got", ()):
                entry = worker.unacked.pop(conn_id, None)
                if entry is not None:
                    os.close(entry[0])
            for conn_id in report.get("lost", ()):
                # The worker never got the fd (it is at its fd limit; it logs that).
                entry = worker.unacked.pop(conn_id, None)
                if entry is not None:
                    os.close(entry[0])
                    worker.load = max(0, worker.load - 1)
                    self.counters["refused"] += 1
                    self.counters["refused_fd_limit"] += 1
            closed = report.get("closed")
            if closed:
                worker.load = max(0, worker.load - closed)
            if "devices" in report:
                worker.devices = report["devices"]
        return True

    def _drop_channel(self, worker: Worker) -> None:
        if worker.chan is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.chan.fileno())
        loop.remove_writer(worker.chan.fileno())
        worker.chan.close()
        worker.chan = None
        worker.batch.clear()  # its fds are the unacked copies, closed by the caller
        while worker.out:
            _, fd = worker.out.popleft()
            if fd is not None:
                os.close(fd)

    def _worker_gone(self, worker: Worker) -> None:
        # Read its last reports first: an fd it confirmed must not be handed out again.
        while worker.chan is not None and self._read_reports(worker):
            if not select.select([worker.chan], [], [], 0)[0]:
                break
        self._drop_channel(worker)
        unacked, worker.unacked = worker.unacked, {}
        for conn_id, (fd, data) in unacked.items():
            try:
                if not self.stopping:
                    self._dispatch(conn_id, data, fd)
            except RuntimeError:
                pass
            finally:
                os.close(fd)

    def _replace(self, worker: Worker, reason: str) -> None:
        self.retire(worker, reason)
        self._reconcile()
        self.on_change()

    def _on_tick(self) -> None:
        self._tick = None
        if self.stopping:
            return
        now = time.monotonic()
        self._heartbeat(now)
        if now - self._last_recycle_check >= RECYCLE_CHECK_INTERVAL:
            self._last_recycle_check = now
            self._recycle_big_workers()
        self._tick = asyncio.get_running_loop().call_later(HEARTBEAT_INTERVAL, self._on_tick)

    def _heartbeat(self, now: float) -> None:
        """Ping every worker; one whose loop has not answered for --worker-timeout is hung:
        kill it, and the reaper replaces it."""
        figures = self.figures()
        for worker in self.workers:
            if not worker.alive:
                continue
            if not worker.answering(now, self.config.worker_timeout):
                log.warning("worker %d (pid %d) has not answered for %.0f s; killing it",
                            worker.index, worker.pid, now - worker.last_pong)
                worker.proc.abort()
                continue
            worker.ping_seq += 1
            self._queue(worker, encode_control(
                "ping", seq=worker.ping_seq,
                daemon=dict(figures, elsewhere=figures["elsewhere"] - worker.load)), None)

    def figures(self) -> dict:
        """The daemon-wide figures a worker may tell any authenticated client (ext.status):
        they ride on the heartbeats, so answering costs the supervisor nothing per request.
        `elsewhere` is the whole load here; each worker's heartbeat takes its own share off."""
        return {"started": self.started, "workers": self.config.workers,
                "elsewhere": self.total_load()}

    def _recycle_big_workers(self) -> None:
        limit = self.config.max_worker_rss
        if not limit:
            return
        for worker in self.serving():
            try:
                rss = worker.ps.memory_info().rss if worker.ps else 0
            except psutil.Error:
                continue
            if rss > limit * 1024 * 1024:
                self._replace(worker, f"RSS {rss / 1048576:.0f} MiB is over "
                                      f"--max-worker-rss {limit}")

    def _exited(self, worker: Worker) -> None:
        """The worker's process ended: forget it, and if it was serving, count the crash
        (quick ones in a row back off) and reconcile, which replaces it."""
        self._worker_gone(worker)
        if worker not in self.workers:
            return
        code = worker.proc.returncode
        if worker.state != "serving" or self.stopping:
            if worker.state == "retiring":
                log.info("worker %d (pid %d) retired (%s)", worker.index, worker.pid,
                         worker.retire_reason)
            worker.state = "gone"
            self.workers.remove(worker)
        else:
            self.counters["worker_restarts"] += 1
            lived = time.time() - worker.started
            self._crash_streak = self._crash_streak + 1 if lived < 5 else 0
            delay = respawn_delay(self._crash_streak)
            self._respawn_after = time.monotonic() + delay
            log.warning("worker %d (pid %d) exited with %s; %d connection(s) lost; replacing it%s",
                        worker.index, worker.pid, _describe_exit(code), worker.load,
                        f" in {delay:.1f} s" if delay else "")
            self._reconcile()
        self.on_change()

    def snapshot(self) -> list[dict]:
        rows = []
        for w in self.workers:
            row = {"index": w.index, "pid": w.pid, "generation": w.generation,
                   "state": w.state, "alive": w.alive,
                   "version": w.version,
                   "connections": w.load, "served": w.served,
                   "age": round(time.time() - w.started, 1)}
            try:
                if w.ps is not None:
                    with w.ps.oneshot():
                        row["rss"] = w.ps.memory_info().rss
                        times = w.ps.cpu_times()
                        row["cpu"] = round(times.user + times.system, 2)
            except psutil.Error:
                pass
            rows.append(row)
        return rows


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def respawn_delay(streak: int) -> float:
    """After quick deaths in a row: at once for the first, then 0.1 s doubling up to 10 s,
    so a process that cannot start does not spin."""
    return 0.0 if streak <= 1 else min(RESPAWN_MAX, 0.1 * 2 ** (streak - 1))


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
