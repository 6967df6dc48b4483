"""The daemon-wide owner of PTY sessions.

One `Hub` holds every PTY session of the daemon, so a terminal started from one connection
can be attached from any other. Its API is shaped like messages on purpose: every call takes
plain JSON values (plus `bytes` for input, which a channel would base64) and returns a JSON
dict or raises protocol.RPCError, and events leave only through the `deliver` callable a
connection registers with `add_peer`. That keeps the hub movable into its own process behind
a local channel without changing what the handlers see.

Flow control. Each attachment's events wait in an outbound queue owned by its connection
(256 frames). `deliver` returning False means that queue overflowed, and the spec's rule is
then to drop the attachment. So that a fast producer does not drop clients that are merely a
little behind, the hub also counts the frames each attachment has not yet reported as
written (`drained`); the pacing rule itself is `pty_output.OutputPump`'s.

Read leases. A session whose attachments all come over one worker link (their peers' `home`)
is lent to that worker (`PtySession.consider_lease`): it reads and writes the PTY itself,
and the hub neither reads nor sends that session's events until the lease comes back. Every
call that changes a session's attachments or input order runs inside `session.owned()`,
which takes the lease back first and lends it again afterwards if it still can.

Replay is queued at once, so a scrollback configured beyond about 12 MiB (256 replay
chunks) overflows a new attachment's queue and drops it on attach.
"""

from __future__ import annotations

import asyncio
import binascii
import fcntl
import logging
import os
import signal
import struct
import subprocess
import tempfile
import termios
import time
import warnings
from collections import deque
from collections.abc import Callable

import orjson

from .cli_bridge import CAPABILITY as CLI_CAPABILITY
from .cli_bridge import MSG_BRIDGE_OFF, CliBridge
from .protocol import (
    NOT_FOUND,
    PTY_INPUT_QUEUE_FULL,
    PTY_INPUT_SEQ_GAP,
    PTY_SESSION_NOT_FOUND,
    PTY_START_FAILED,
    REMOTE_CONNECTION_INACTIVE,
    UNAVAILABLE,
    RPCError,
    b64,
)
from .fd_store import FdStore, process_start
from .front import forwarded
from .pty_output import OutputPump
from .pty_ring import Ring
from .pty_rules import (
    DIMENSION_MAX,
    INPUT_CHUNK,
    INPUT_QUEUE_CHUNKS,
    MSG_ATTACHMENT_NOT_FOUND,
    MSG_INACTIVE,
    MSG_NO_HUB,
    MSG_QUEUE_FULL,
    MSG_SESSION_NOT_FOUND,
    REPLAY_CHUNK,
    BEHIND_FRAMES,
    OUTBOUND_FRAMES,
    STALL_TIMEOUT,
    AttachmentEvents,
    data_frame_head,
    pty_error_event,
    tokens_equal,
)
from .sizing import SizeCoordinator

log = logging.getLogger("cmuxd.hub")

INLINE_COMMAND_MAX = 122880
"""Longer commands go through a temporary script: argv has a size limit, a file has not."""
SHUTDOWN_GRACE = 1.0
"""Between SIGHUP and SIGKILL when the daemon stops."""

FALLBACK_SHELLS = ("/bin/bash", "/usr/bin/bash", "/bin/sh")

PTY_CAPABILITIES = (
    "pty.session",
    "pty.session.token",
    "pty.write.notification",
    "pty.resize.notification",
    "pty.attach.cancel",
    "pty.input.seq_ack",
)
PERSISTENT_CAPABILITY = "pty.session.persistent_daemon"


def _quote(text: str) -> str:
    return orjson.dumps(text).decode()


def _os_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _clamp(value: int) -> int:
    return min(value, DIMENSION_MAX)


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _get_winsize(fd: int) -> tuple[int, int]:
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return cols, rows


def resolve_shell(configured: str | None) -> str:
    if configured:
        return configured
    env_shell = os.environ.get("SHELL", "")
    if env_shell and os.path.isfile(env_shell):
        return env_shell
    for candidate in FALLBACK_SHELLS:
        if os.path.isfile(candidate):
            return candidate
    return "/bin/sh"


def child_environment(shell: str, connection_env: dict[str, str] | None = None) -> dict[str, str]:
    """The daemon's environment, adjusted so programs see a modern UTF-8 colour terminal.
    A session started through the front door takes the SSH connection's variables (and
    none of the daemon's of the same kind) from `connection_env`."""
    env = dict(os.environ)
    if connection_env is not None:
        env = {k: v for k, v in env.items() if not forwarded(k)}
        env.update(connection_env)
    env["TERM"] = "xterm-256color"
    for key, value in (("COLORTERM", "truecolor"), ("TERM_PROGRAM", "ghostty"), ("SHELL", shell)):
        if not env.get(key):
            env[key] = value
    locale = next((env[k] for k in ("LC_ALL", "LC_CTYPE", "LANG") if env.get(k)), "")
    folded = locale.upper()
    if "UTF-8" not in folded and "UTF8" not in folded:
        for key in ("LC_ALL", "LC_CTYPE", "LANG"):
            env[key] = "C.UTF-8"
    return env


def _take_controlling_tty() -> None:
    # Runs in the child between fork and exec, after setsid(): stdin is the PTY's slave side.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class _Exit(asyncio.SubprocessProtocol):
    """Tells the session its process was reaped (asyncio's child watcher does the waiting)."""

    def __init__(self, session: "PtySession"):
        self.session = session

    def process_exited(self) -> None:
        self.session._process_exited()


class Attachment(AttachmentEvents):
    __slots__ = (
        "session", "id", "token", "peer", "cols", "rows", "seq_ack", "next_seq",
        "acked", "behind", "slow", "attached", "ext", "wants_exit_status", "key", "frame_head",
    )

    def __init__(self, session, attachment_id, token, peer, cols, rows, seq_ack, ext,
                 wants_exit_status=False):
        self.session: PtySession = session
        self.id: str = attachment_id
        self.token: str = token
        self.peer: int = peer
        self.cols = cols
        self.rows = rows
        self.seq_ack: bool = seq_ack
        self.next_seq = 1
        self.acked = 0
        self.behind = 0
        """Frames delivered that the peer has not yet reported written."""
        self.slow = False
        """Behind for longer than the stall timeout: no longer holds the PTY's reading back."""
        self.attached = True
        self.ext: bool = ext
        """The client asked for absolute offsets (spec §6.8), so its events carry them."""
        self.wants_exit_status = wants_exit_status
        """The client sent `ext_exit_status` (spec §6.8): its pty.exit may carry the status."""
        self.key = (session.id, attachment_id, token)
        self.frame_head = data_frame_head(*self.key)


class _AttachRequest:
    """One pty.attach on its way into a session."""

    __slots__ = ("peer", "attachment_id", "token", "cols", "rows", "seq_ack", "abandoned",
                 "attachment", "replay", "resume_from", "wants_exit_status")

    def __init__(self, peer, attachment_id, token, cols, rows, seq_ack, resume_from,
                 wants_exit_status):
        self.peer = peer
        self.attachment_id = attachment_id
        self.token = token
        self.cols = cols
        self.rows = rows
        self.seq_ack = seq_ack
        self.resume_from: int | None = resume_from
        self.wants_exit_status = wants_exit_status
        self.abandoned = False
        self.attachment: Attachment | None = None
        self.replay = 0


class LeaseGrant:
    """A session's reading lent to one worker: the PTY master and the ring are shared with
    it, and the hub neither reads the PTY nor sends that session's events until it is back."""

    __slots__ = ("home", "id", "known_head", "released", "revoking")

    def __init__(self, home, lease_id: int, known_head: int):
        self.home = home
        self.id = lease_id
        self.known_head = known_head
        """The ring's head when lent: a holder that dies can be cut back to it, no further."""
        self.released: asyncio.Future = asyncio.get_running_loop().create_future()
        self.revoking = False


class PtySession:
    """One process on one PTY, its scrollback, its attachments and its input queue."""

    def __init__(self, hub: "Hub", session_id: str, master: int, slave: int | None,
                 ring: Ring | None = None):
        self.hub = hub
        self.id = session_id
        self.master = master
        self.slave: int | None = slave
        self.sizes = SizeCoordinator()
        self.attachments: dict[str, Attachment] = {}
        self.ring = ring if ring is not None else Ring.create(hub.scrollback)
        self.pump: OutputPump | None = None
        self.lease: LeaseGrant | None = None
        self.pins = 0
        """Calls that need the session back from a lease holder; none is lent meanwhile."""
        self.command = ""
        """What the session runs, for pty.list's `ext_command`."""
        self.exit_status: dict | None = None
        """`{"code": n}` or `{"signal": n}` once the process has been reaped."""
        self.cli_path: str | None = None
        """This session's CLI bridge socket, if it has one."""
        self.transport: asyncio.SubprocessTransport | None = None
        self.pid: int | None = None
        self.script: str | None = None
        self.started: asyncio.Task | None = None
        self.exited: asyncio.Future = asyncio.get_running_loop().create_future()
        self.eof = False
        self.ended = False
        self.input: deque[list] = deque()
        """Entries [chunk (memoryview), acks [(attachment, seq)], forwarded input id or 0],
        in PTY order."""
        self.writer_armed = False
        self.pump_scheduled = False
        self.idle_timer: asyncio.TimerHandle | None = None

    @property
    def incarnation(self) -> str:
        return self.ring.incarnation

    # process

    async def start(self, command: str, cols: int, rows: int,
                    connection_env: dict[str, str] | None = None) -> None:
        loop = asyncio.get_running_loop()
        shell = resolve_shell(self.hub.shell)
        command = command.strip()
        self.command = command or shell
        if not command:
            argv = [shell]
        elif len(command.encode("utf-8", "surrogatepass")) <= INLINE_COMMAND_MAX:
            argv = ["/bin/sh", "-c", command]
        else:
            self.script = _write_script(command)
            argv = ["/bin/sh", self.script]
        home = os.environ.get("HOME", "")
        # A terminal opens in the home directory, whatever directory the daemon runs in.
        cwd = home if home and os.path.isdir(home) else None
        _set_winsize(self.master, cols, rows)
        env = child_environment(shell, connection_env)
        bridge = self.hub.cli
        if bridge is not None:
            try:
                self.cli_path = env["CMUX_SOCKET_PATH"] = bridge.open(self.id)
            except OSError as exc:
                log.warning("PTY %s starts without a CLI bridge: could not listen in %s: %s",
                            self.id, bridge.dir, _os_text(exc))
        try:
            self.transport, _ = await loop.subprocess_exec(
                lambda: _Exit(self),
                *argv,
                stdin=self.slave,
                stdout=self.slave,
                stderr=self.slave,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_take_controlling_tty,
            )
        finally:
            os.close(self.slave)
            self.slave = None
        self.pid = self.transport.get_pid()

    def _process_exited(self, code: int | None = None) -> None:
        if code is None and self.transport is not None:
            code = self.transport.get_returncode()
        if code is not None and self.exit_status is None:
            self.exit_status = {"signal": -code} if code < 0 else {"code": code}
        if not self.exited.done():
            self.exited.set_result(None)
        if self.eof:
            self.finish()

    def signal(self, signum: int) -> None:
        """Signal every process of the session, not just the leader's group: an interactive
        shell runs its jobs in groups of their own, and they outlive a leader that is gone."""
        if self.pid is None:
            return
        members = session_members(self.pid)
        if not self.exited.done():
            members.add(self.pid)
        for pid in members:
            try:
                os.kill(pid, signum)
            except OSError:
                pass

    def finish(self) -> None:
        """The session is over: release everything, then end every attachment. Frames queued
        before pty.exit still reach the client first, since they share its queue."""
        if self.ended:
            return
        self.ended = True
        hub = self.hub
        if hub.sessions.get(self.id) is self:
            del hub.sessions[self.id]
            if hub.on_session_end is not None:
                hub.on_session_end()
        if hub.fd_store is not None and self.pid is not None:
            hub.fd_store.drop(self.incarnation)
        if self.cli_path is not None:
            hub.cli.close_socket(self.cli_path)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.lease is not None:
            # The holder stops reading before it sees the pty.exit events that follow.
            grant, self.lease = self.lease, None
            grant.home.end_lease(self, grant)
            if not grant.released.done():
                grant.released.set_result(None)
        if self.started is None or self.started.done():
            self.release()
        # else the start in progress owns the descriptors and calls release() itself.
        for att in list(self.attachments.values()):
            att.attached = False
            hub._deliver_exit(att, self.exit_status)
        self.attachments.clear()

    def release(self) -> None:
        if self.pump is not None:
            self.pump.close()
            self.pump = None
        if self.writer_armed:
            asyncio.get_running_loop().remove_writer(self.master)
            self.writer_armed = False
        self.input.clear()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1
        if self.slave is not None:
            os.close(self.slave)
            self.slave = None
        self.ring.close()
        if self.transport is not None:
            self.transport.close()
        if self.script is not None:
            if self.pid is None or self.exited.done():
                self._remove_script()
            else:
                self.exited.add_done_callback(lambda _: self._remove_script())

    def _remove_script(self) -> None:
        if self.script is not None:
            try:
                os.unlink(self.script)
            except OSError:
                pass
            self.script = None

    # output

    def read_here(self) -> None:
        """The hub reads the PTY itself (no lease, or the lease came back)."""
        if self.pump is None and not self.eof and not self.ended and self.master >= 0:
            self.pump = OutputPump(self.id, self.master, self.ring, self.attachments,
                                   self.hub._send_data, self._on_eof, self.hub.stall_timeout)
        self.update_reading()

    def _on_eof(self) -> None:
        self.pump = None
        self.eof = True
        if self.exited.done():
            self.finish()

    def update_reading(self) -> None:
        if self.pump is not None:
            self.pump.update()

    # the read lease

    def consider_lease(self) -> None:
        """Lend the reading to the worker that serves every attachment, if one does: then a
        keystroke and its echo cross that worker alone."""
        if (self.lease is not None or self.pins or self.ended or self.eof or not self.attachments
                or self.started is None or not self.started.done() or self.master < 0):
            return
        homes = {self.hub.homes.get(att.peer) for att in self.attachments.values()}
        if len(homes) != 1:
            return
        home = homes.pop()
        if home is None or not home.can_hold_leases:
            return
        if self.pump is not None:
            self.pump.close()
            self.pump = None
        self.hub._lease_counter += 1
        self.lease = LeaseGrant(home, self.hub._lease_counter, self.ring.head)
        home.grant_lease(self, self.lease)

    async def reclaim(self) -> None:
        """Take the reading back before the set of attachments changes."""
        while self.lease is not None:
            grant = self.lease
            if not grant.revoking:
                grant.revoking = True
                grant.home.revoke_lease(self, grant)
            await asyncio.shield(grant.released)

    def owned(self) -> "_Owned":
        """`async with session.owned():` — the hub alone reads this session inside."""
        return _Owned(self)

    def lease_returned(self, grant: LeaseGrant, state: dict | None) -> None:
        """The holder gave the lease back (`state` says what changed while it read), or died
        (`state` is None): keep what it published in the ring, cut anything torn."""
        if self.lease is not grant:
            return
        self.lease = None
        if self.ring.recover(grant.known_head):
            log.warning("PTY %s: the ring its reader left was torn; cut back to offset %d",
                        self.id, grant.known_head)
        if state is not None:
            for entry in state.get("attachments", ()):
                att = self.attachments.get(entry["attachment_id"])
                if att is None:
                    continue
                att.next_seq, att.acked = entry["next_seq"], entry["acked"]
                att.behind, att.slow = entry["behind"], entry["slow"]
            for aid in state.get("dropped", ()):
                att = self.attachments.get(aid)
                if att is not None:  # its pty.exit went out from the holder
                    self._remove(att)
            if state.get("eof"):
                self.eof = True
        if not grant.released.done():
            grant.released.set_result(None)
        if self.eof:
            if self.exited.done():
                self.finish()
            return
        self.read_here()
        self.consider_lease()

    # input

    def enqueue(self, att: Attachment, data: bytes, seq: int | None, *, force: bool = False,
                fid: int = 0) -> None:
        """Queue input whole or not at all. `force` takes the rest of a write whose start the
        lease holder already wrote to the PTY (at most one chunk over the limit); `fid` names
        a forwarded input, whose holder is told when it is written."""
        view = memoryview(data)  # chunks share the caller's buffer: no copy of a large write
        chunks = [view[i : i + INPUT_CHUNK] for i in range(0, len(view), INPUT_CHUNK)]
        if not force and len(self.input) + len(chunks) > INPUT_QUEUE_CHUNKS:
            raise RPCError(PTY_INPUT_QUEUE_FULL, MSG_QUEUE_FULL)
        if seq is not None:
            att.next_seq = seq + 1
        if chunks:
            self.ring.touch()
        ack = (att, seq) if seq is not None and att.seq_ack else None
        if not chunks and not self.input:
            self._written({ack[0]: ack[1]} if ack else {}, [fid] if fid else [])
            return
        # An empty write is done when everything queued before it is.
        entry = [memoryview(b""), [], 0]
        for chunk in chunks:
            entry = [chunk, [], 0]
            self.input.append(entry)
        if not chunks:
            self.input.append(entry)
        if ack is not None:
            entry[1].append(ack)
        entry[2] = fid
        if not self.writer_armed and not self.pump_scheduled:
            self.pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump_input)

    def _pump_input(self) -> None:
        """The session's single writer: apply queued chunks in order until the PTY pushes back."""
        self.pump_scheduled = False
        if self.ended:
            return
        queue = self.input
        acks: dict[Attachment, int] = {}
        fids: list[int] = []
        blocked = False
        while queue:
            entry = queue[0]
            try:
                written = os.write(self.master, entry[0]) if entry[0] else 0
            except BlockingIOError:
                blocked = True
                break
            except OSError as exc:
                log.info("writing to PTY %s failed: %s", self.id, exc)
                queue.clear()
                break
            if written < len(entry[0]):
                entry[0] = entry[0][written:]
                continue
            queue.popleft()
            for att, seq in entry[1]:
                acks[att] = seq
            if entry[2]:
                fids.append(entry[2])
        loop = asyncio.get_running_loop()
        if blocked and not self.writer_armed:
            loop.add_writer(self.master, self._pump_input)
            self.writer_armed = True
        elif not blocked and self.writer_armed:
            loop.remove_writer(self.master)
            self.writer_armed = False
        self._written(acks, fids)

    def _written(self, acks: dict, fids: list[int]) -> None:
        """Cumulative acks: one per attachment per pass covers every write it finished. While
        lent, the holder sends them, in order with the output it reads, and learns which of
        its forwarded inputs are written and whether the queue is empty."""
        grant = self.lease
        if grant is not None:
            grant.home.input_done(self, grant, {a.id: s for a, s in acks.items()}, fids,
                                  idle=not self.input)
            return
        for att, seq in acks.items():
            self.hub._ack(att, seq)

    # attachments

    def attach(self, want: "_AttachRequest") -> None:
        hub = self.hub
        old = self.attachments.get(want.attachment_id)
        if old is not None:
            self._remove(old)
            hub._deliver_exit(old)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        att = Attachment(self, want.attachment_id, want.token, want.peer, want.cols, want.rows,
                         want.seq_ack, want.resume_from is not None, want.wants_exit_status)
        self.attachments[att.id] = att
        self.sizes.set(att.id, att.cols, att.rows, persistent=True)
        self.apply_size()
        # Ready, snapshot and registration happen in one step, so the replay ends exactly
        # where live output begins.
        offset, snapshot = self.ring.read(want.resume_from)
        want.attachment = att
        want.replay = len(snapshot)
        ready = att.event("pty.ready", ext_incarnation=self.incarnation, ext_offset=offset) \
            if att.ext else att.event("pty.ready")
        if hub._send(att, ready):
            for i in range(0, len(snapshot), REPLAY_CHUNK):
                chunk = b64(snapshot[i : i + REPLAY_CHUNK])
                if not hub._send(att, att.data_event(chunk, offset + i)):
                    break

    def _remove(self, att: Attachment) -> None:
        att.attached = False
        if self.attachments.get(att.id) is att:
            del self.attachments[att.id]
            self.sizes.remove(att.id)
            self.apply_size()
        if not self.attachments:
            self._arm_idle()
        self.update_reading()

    def resize(self, att: Attachment, cols: int, rows: int) -> None:
        att.cols, att.rows = cols, rows
        self.sizes.set(att.id, cols, rows, persistent=True)
        self.apply_size()

    def apply_size(self) -> None:
        cols, rows = self.sizes.size
        if cols and rows and self.master >= 0:
            try:
                _set_winsize(self.master, cols, rows)
            except OSError as exc:
                log.info("resizing PTY %s failed: %s", self.id, exc)

    def _arm_idle(self) -> None:
        if self.idle_timer is None and not self.ended:
            self.idle_timer = asyncio.get_running_loop().call_later(self.hub.idle_ttl, self._idle)

    def _idle(self) -> None:
        self.idle_timer = None
        if not self.attachments:
            self.kill()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.finish()

    def snapshot(self, command: bool = False, idle: bool = False,
                 offsets: bool = False) -> dict:
        """The pty.list entry; the `ext_` keys only for a client that asked for them."""
        entry = self.sizes.snapshot(self.id, ("cols", "rows", "persistent"))
        entry["scrollback_bytes"] = len(self.ring)
        if command:
            entry["ext_command"] = self.command
        if idle:
            entry["ext_idle_s"] = round(time.monotonic() - self.ring.touched, 1)
        if offsets:
            entry["ext_incarnation"] = self.incarnation
            entry["ext_offset"] = self.ring.head
        return entry


class _Owned:
    __slots__ = ("session",)

    def __init__(self, session: PtySession):
        self.session = session

    async def __aenter__(self) -> PtySession:
        self.session.pins += 1
        try:
            await self.session.reclaim()
        except BaseException:
            self.session.pins -= 1
            raise
        return self.session

    async def __aexit__(self, *exc) -> None:
        self.session.pins -= 1
        self.session.consider_lease()


def session_members(sid: int) -> set[int]:
    """The processes in session `sid` (the pid of its leader), as far as we may see them."""
    import psutil  # here, not at the top: workers import this module and never need it

    members = set()
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                members.add(pid)
        except OSError:  # gone, or (macOS) in a session we may not look into
            pass
    return members


def _write_script(command: str) -> str:
    fd, path = tempfile.mkstemp(prefix="cmuxd-command-", suffix=".sh")
    try:
        view = memoryview(command.encode("utf-8", "surrogatepass"))
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, 0o400)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


def watch_children_without_threads() -> None:
    """Starting a PTY process runs code between fork and exec (it takes the controlling
    terminal), which is only safe in a process with no other threads; asyncio's default child
    watcher starts a thread per child. Where Linux offers pidfds, watch children with them."""
    if not hasattr(os, "pidfd_open") or not hasattr(asyncio, "PidfdChildWatcher"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return  # a kernel without pidfds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        watcher = asyncio.PidfdChildWatcher()
        asyncio.set_child_watcher(watcher)
        watcher.attach_loop(asyncio.get_running_loop())


class Hub:
    """Every PTY session of the daemon. See the module docstring for the shape of the API."""

    def __init__(self, *, scrollback: int = 1 << 20, idle_ttl: float = 86400.0,
                 shell: str | None = None, cli_bridge: bool = False,
                 cli_dir: str | None = None):
        """`cli_bridge` gives each session a CLI bridge socket in `cli_dir` (a private
        temporary directory when None); see cli_bridge.py."""
        self.scrollback = scrollback
        self.idle_ttl = idle_ttl
        self.shell = shell
        self.stall_timeout = STALL_TIMEOUT
        self.sessions: dict[str, PtySession] = {}
        self.peers: dict[int, Callable[[dict], bool]] = {}
        self.direct: dict[int, Callable[[tuple, bytes], bool]] = {}
        self.homes: dict[int, object] = {}
        """The worker link each remote peer comes over; it can hold read leases."""
        self._peer_counter = 0
        self._lease_counter = 0
        self.on_session_end: Callable[[], None] | None = None
        self.fd_store: FdStore | None = None
        """Where each session is stored so that it outlives a crash of this process."""
        self.pending: dict[tuple[str, int], list] = {}
        """Attachments carried across an upgrade, until their worker's peer is back."""
        self._supported: bool | None = None
        self.closing = False
        self.cli = CliBridge(self._cli_candidates, cli_dir) if cli_bridge else None

    # capabilities and peers

    def supported(self) -> bool:
        if self._supported is None:
            try:
                master, slave = os.openpty()
            except (OSError, AttributeError):
                self._supported = False
            else:
                os.close(master)
                os.close(slave)
                self._supported = True
        return self._supported

    def capabilities(self, persistent: bool) -> list[str]:
        if not self.supported():
            return []
        caps = list(PTY_CAPABILITIES)
        if persistent:
            caps.append(PERSISTENT_CAPABILITY)
        if self.cli is not None:
            caps.append(CLI_CAPABILITY)
        return caps

    def add_peer(self, deliver: Callable[[dict], bool], send_now=None, home=None) -> int:
        """Register a connection; `deliver(event) -> bool` queues one event for it and returns
        False when that attachment's outbound queue is full. A connection in this process
        may also give `send_now(key, frame) -> bool`, which writes an encoded pty.data at
        once if nothing of that connection waits before it. A connection served by another
        process names the link it comes over as its `home`."""
        self._peer_counter += 1
        self.peers[self._peer_counter] = deliver
        if send_now is not None:
            self.direct[self._peer_counter] = send_now
        if home is not None:
            self.homes[self._peer_counter] = home
        return self._peer_counter

    async def remove_peer(self, peer: int) -> None:
        self.peers.pop(peer, None)
        self.direct.pop(peer, None)
        self.homes.pop(peer, None)
        if self.cli is not None:
            self.cli.peer_gone(peer)
        for session in list(self.sessions.values()):
            if any(att.peer == peer for att in session.attachments.values()):
                async with session.owned():
                    for att in list(session.attachments.values()):
                        if att.peer == peer:
                            session._remove(att)

    # the CLI bridge

    def _cli_candidates(self, session_id: str) -> list[int]:
        """Peers attached to the session, most recently attached first (attachments keep
        the order they were made in; a re-attach moves to the end)."""
        session = self.sessions.get(session_id)
        if session is None:
            return []
        return list(dict.fromkeys(att.peer for att in reversed(session.attachments.values())))

    def _bridge(self) -> CliBridge:
        if self.cli is None:
            raise RPCError(UNAVAILABLE, MSG_BRIDGE_OFF)
        return self.cli

    def cli_subscribe(self, peer: int, push: Callable[[dict], bool]) -> dict:
        """The peer handles cli.request: `push(event) -> bool` sends it one."""
        if peer not in self.peers:
            raise RPCError(REMOTE_CONNECTION_INACTIVE, MSG_INACTIVE)
        return self._bridge().subscribe(peer, push)

    def cli_response(self, peer: int, request_id: str, ok: bool, data: bytes | None,
                     error=None) -> dict:
        return self._bridge().respond(peer, request_id, ok, data, error)

    # read leases (see PtySession.consider_lease)

    def lease_lost(self, home) -> None:
        """A worker holding leases is gone: its sessions are read here again."""
        for session in list(self.sessions.values()):
            if session.lease is not None and session.lease.home is home:
                session.lease_returned(session.lease, None)

    def lease_released(self, session_id: str, lease_id: int, state: dict) -> None:
        session = self.sessions.get(session_id)
        if session is not None and session.lease is not None and session.lease.id == lease_id:
            session.lease_returned(session.lease, state)

    def leased(self, session_id: str) -> PtySession | None:
        session = self.sessions.get(session_id)
        return session if session is not None and session.lease is not None else None

    def forwarded_input(self, session_id: str, attachment_id: str, data: bytes,
                        seq: int | None, force: bool, fid: int) -> dict:
        """Input a lease holder could not write at once: it checked token and sequence."""
        session = self.sessions.get(session_id)
        att = None if session is None else session.attachments.get(attachment_id)
        if att is None:
            raise RPCError(NOT_FOUND, MSG_ATTACHMENT_NOT_FOUND)
        session.enqueue(att, data, seq, force=force, fid=fid)
        return {"written": len(data)}

    def drained(self, peer: int, session_id: str, attachment_id: str, token: str,
                frames: int) -> None:
        """The peer wrote `frames` events of this attachment to its client."""
        session = self.sessions.get(session_id)
        if session is None:
            return
        att = session.attachments.get(attachment_id)
        if att is None or att.peer != peer or att.token != token:
            return
        att.behind = max(0, att.behind - frames)
        if att.behind < BEHIND_FRAMES:
            att.slow = False
        session.update_reading()

    # delivery

    def _send_data(self, att: Attachment, encoded: bytes, offset: int) -> bool:
        """Output read here (see OutputPump.send_data): a connection of this process writes
        it at once if it can, with no event object and nothing to count; else it is queued
        as an event."""
        send_now = self.direct.get(att.peer)
        if send_now is not None and att.attached and send_now(att.key, att.data_frame(encoded,
                                                                                       offset)):
            return True
        self._send(att, att.data_event(encoded.decode("ascii"), offset))
        return False

    def _send(self, att: Attachment, event: dict) -> bool:
        """Queue one event for an attachment; an overflowing queue drops the attachment."""
        if not att.attached:
            return False
        deliver = self.peers.get(att.peer)
        if deliver is None:
            return True
        # A remote peer's queue is in its worker: frames not yet reported drained count.
        # Counted before delivery: a connection may write the frame and report it at once.
        if att.peer not in self.homes or att.behind < OUTBOUND_FRAMES:
            att.behind += 1
            if deliver(event):
                return True
            att.behind -= 1
        log.info("PTY %s attachment %s fell behind and was dropped", att.session.id, att.id)
        att.session._remove(att)
        self._deliver_exit(att)
        return False

    def _deliver_exit(self, att: Attachment, exit_status: dict | None = None) -> None:
        """pty.exit; `exit_status` when the process ended, for a client that asked for it."""
        deliver = self.peers.get(att.peer)
        if deliver is None:
            return
        if exit_status is not None and att.wants_exit_status:
            deliver(att.event("pty.exit", ext_exit_status=exit_status))
        else:
            deliver(att.event("pty.exit"))

    def _ack(self, att: Attachment, seq: int) -> None:
        if att.attached and seq > att.acked:
            att.acked = seq
            self._send(att, att.event("pty.input_ack", seq=seq))

    def _find(self, session_id: str, attachment_id: str, token: str) -> Attachment:
        session = self.sessions.get(session_id)
        att = None if session is None else session.attachments.get(attachment_id)
        if att is None or not tokens_equal(att.token, token):
            raise RPCError(NOT_FOUND, MSG_ATTACHMENT_NOT_FOUND)
        return att

    # methods

    async def attach(self, peer: int, session_id: str, attachment_id: str, token: str,
                     cols: int, rows: int, command: str | None, require_existing: bool,
                     input_seq_ack: bool, reserved: Callable[[], None] | None = None,
                     resume_from: int | None = None, wants_exit_status: bool = False,
                     env: dict[str, str] | None = None) -> dict:
        """Attach, starting the session's process first if needed (with `env`, the
        connection's variables, when it came through the front door).

        `reserved()` is called once the session exists in the hub (found, or created and
        starting), before any wait: from then on other calls observe it, so the caller may
        go on reading requests while the process starts. It is not called when the attach
        fails before that point.
        """
        if self.closing or peer not in self.peers:
            # Also a connection that ended while its attach travelled here.
            raise RPCError(REMOTE_CONNECTION_INACTIVE, MSG_INACTIVE)
        if not self.supported():
            raise RPCError(UNAVAILABLE, MSG_NO_HUB)
        cols, rows = _clamp(cols), _clamp(rows)
        want = _AttachRequest(peer, attachment_id, token, cols, rows, input_seq_ack, resume_from,
                              wants_exit_status)
        session = self.sessions.get(session_id)
        starter = session is None
        if starter:
            if require_existing:
                raise RPCError(
                    PTY_SESSION_NOT_FOUND,
                    f"persistent PTY session {_quote(session_id)} is not running",
                )
            try:
                master, slave = os.openpty()
            except OSError as exc:
                raise RPCError(
                    PTY_START_FAILED, f"could not allocate a remote PTY: {_os_text(exc)}"
                ) from None
            session = self.sessions[session_id] = PtySession(self, session_id, master, slave)
            session.started = asyncio.get_running_loop().create_task(
                self._start(session, command or "", want, env)
            )
        if reserved is not None:
            reserved()
        if not session.started.done():
            try:
                await asyncio.shield(session.started)
            except asyncio.CancelledError:
                want.abandoned = True
                if want.attachment is not None:
                    self._detach(want.attachment)
                raise
        failure = session.started.result()
        if failure is not None:
            code = PTY_SESSION_NOT_FOUND if require_existing else PTY_START_FAILED
            raise RPCError(code, failure)
        if self.closing or peer not in self.peers:
            raise RPCError(REMOTE_CONNECTION_INACTIVE, MSG_INACTIVE)
        # A starter whose attachment went live has attached, even if the session has ended
        # since: the client saw pty.ready, and pty.exit closes that attachment.
        if not starter:
            async with session.owned():
                if self.closing or peer not in self.peers:
                    raise RPCError(REMOTE_CONNECTION_INACTIVE, MSG_INACTIVE)
                if not session.ended:
                    session.attach(want)
        if want.attachment is None:
            code = PTY_SESSION_NOT_FOUND if require_existing else PTY_START_FAILED
            raise RPCError(code, f"PTY session {_quote(session_id)} ended before the attach completed")
        return {
            "session_id": session_id,
            "attachment_id": attachment_id,
            "attachment_token": token,
            "attached": True,
            "replay_bytes": want.replay,
        }

    async def _start(self, session: PtySession, command: str, first: "_AttachRequest",
                     env: dict[str, str] | None = None) -> str | None:
        """Start the process; the failure text, or None.

        Runs apart from any one attach, so a cancelled attach never leaves a half-started
        session. The attach that started the session is attached here, before the first
        read, so it sees every byte the process writes live (its replay is empty).
        """
        try:
            await session.start(command, first.cols, first.rows, env)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            session.finish()
            session.release()
            return f"could not start the PTY process: {_os_text(exc)}"
        if session.ended or self.closing:
            # Closed (pty.close, shutdown) while it was starting.
            session.signal(signal.SIGKILL)
            session.finish()
            session.release()
            return None
        session.sizes.last_cols, session.sizes.last_rows = first.cols, first.rows
        if not first.abandoned and first.peer in self.peers:
            session.attach(first)
        else:
            session._arm_idle()
        os.set_blocking(session.master, False)
        if self.fd_store is not None:
            self.fd_store.keep(session)
        session.read_here()
        # Once this start is done (`started` counts), not from inside it.
        asyncio.get_running_loop().call_soon(session.consider_lease)
        return None

    async def cancel(self, peer: int, session_id: str, attachment_id: str, token: str) -> None:
        try:
            att = self._find(session_id, attachment_id, token)
        except RPCError:
            return
        async with att.session.owned():
            self._detach(att)

    def write(self, peer: int, session_id: str, attachment_id: str, token: str, data: bytes,
              seq: int | None, notification: bool) -> dict:
        """Queue input. A notification that fails on sequence or capacity also detaches, since
        its sender will never see an error response to resynchronise on: its pty.error goes
        out here, in the attachment's own queue, so that pty.exit stays the last event."""
        att = self._find(session_id, attachment_id, token)
        try:
            if seq is not None and seq != att.next_seq:
                raise RPCError(PTY_INPUT_SEQ_GAP, f"PTY input sequence gap: got {seq}, want {att.next_seq}")
            att.session.enqueue(att, data, seq)
        except RPCError as exc:
            if not notification:
                raise
            self._send(att, pty_error_event(session_id, attachment_id, token, exc.code,
                                            exc.message))
            self._detach(att)
            return {"written": 0}
        return {"written": len(data)}

    def resize(self, peer: int, session_id: str, attachment_id: str, token: str, cols: int,
               rows: int) -> dict:
        att = self._find(session_id, attachment_id, token)
        att.session.resize(att, _clamp(cols), _clamp(rows))
        return {"resized": True}

    def detach(self, peer: int, session_id: str, attachment_id: str, token: str) -> dict:
        self._detach(self._find(session_id, attachment_id, token))
        return {"detached": True}

    def _detach(self, att: Attachment) -> None:
        if not att.attached:
            return
        att.session._remove(att)
        self._deliver_exit(att)

    def close(self, session_id: str) -> dict:
        session = self.sessions.get(session_id)
        if session is None:
            raise RPCError(NOT_FOUND, MSG_SESSION_NOT_FOUND)
        session.kill()
        return {"session_id": session_id, "closed": True}

    def list(self, command: bool = False, idle: bool = False, offsets: bool = False) -> dict:
        sessions = sorted(self.sessions.values(), key=lambda s: s.id.encode("utf-8", "surrogatepass"))
        return {"sessions": [s.snapshot(command, idle, offsets) for s in sessions
                             if s.pid is not None]}

    async def shutdown(self) -> None:
        """Stop every session: SIGHUP, then SIGKILL whatever outlived the grace period."""
        self.closing = True
        sessions = list(self.sessions.values())
        starting = [s.started for s in sessions if s.started is not None and not s.started.done()]
        if starting:
            await asyncio.gather(*starting, return_exceptions=True)
        sessions = [s for s in sessions if s.pid is not None]
        for session in sessions:
            session.signal(signal.SIGHUP)
        waiting = [s.exited for s in sessions if not s.exited.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=SHUTDOWN_GRACE)
        for session in sessions:
            session.signal(signal.SIGKILL)
        waiting = [s.exited for s in sessions if not s.exited.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=SHUTDOWN_GRACE * 5)
        for session in list(self.sessions.values()):
            session.finish()
        if self.cli is not None:
            self.cli.close()


    # handing the sessions to the next image of this process (an upgrade)

    async def take_back_leases(self, timeout: float) -> bool:
        """Every lent session read here again, so no worker appends to a ring while the hub
        changes its code; False if a holder did not answer in time."""
        leased = [s for s in self.sessions.values() if s.lease is not None]
        for session in leased:
            session.pins += 1
        try:
            await asyncio.wait_for(asyncio.gather(*(s.reclaim() for s in leased)), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            for session in leased:
                session.pins -= 1

    def export_state(self) -> tuple[dict, list[int]]:
        """What the next image needs to go on with every session, and the fds it must keep:
        each PTY master and ring. Attachments are not carried: their connections lose the
        link anyway, and a client attaches again (with its offset)."""
        fds: list[int] = []
        sessions = []
        for s in self.sessions.values():
            if s.pid is None or s.ended or s.master < 0:
                continue
            attachments = []
            for att in s.attachments.values():
                home = self.homes.get(att.peer)
                name = home.remote_name(att.peer) if home is not None else None
                if name is not None:
                    attachments.append({
                        "worker": name[0], "peer": name[1], "attachment_id": att.id,
                        "token": att.token, "cols": att.cols, "rows": att.rows,
                        "seq_ack": att.seq_ack, "next_seq": att.next_seq, "acked": att.acked,
                        "ext": att.ext, "wants_exit_status": att.wants_exit_status})
            sessions.append({
                "attachments": attachments, "sent": s.ring.head,
                "session_id": s.id, "pid": s.pid, "command": s.command, "script": s.script,
                "master": len(fds), "ring": len(fds) + 1, "cols": s.sizes.last_cols,
                "rows": s.sizes.last_rows, "eof": s.eof, "exit_status": s.exit_status,
                "exited": s.exited.done(), "cli_path": s.cli_path,
                "input": [b64(bytes(entry[0])) for entry in s.input if entry[0]],
            })
            fds += [s.master, s.ring.fd]
        return {"state_version": STATE_VERSION, "sessions": sessions}, fds

    def adopt_state(self, state: dict, fds: list[int]) -> None:
        """Go on with the sessions an earlier image of this process handed over."""
        check_state(state, len(fds))
        watcher = asyncio.get_child_watcher()
        for entry in state["sessions"]:
            session = self._adopt(entry, fds[entry["master"]], Ring.attach(fds[entry["ring"]]))
            for att in entry["attachments"]:
                self.pending.setdefault((att["worker"], att["peer"]), []).append(
                    (session.id, entry["sent"], att))
            for data in entry["input"]:
                session.input.append([memoryview(binascii.a2b_base64(data)), [], 0])
            if entry["exited"]:
                session._process_exited()
            else:
                watcher.add_child_handler(session.pid, _reaped, session)
            self._resume(session)
        if self.pending:
            asyncio.get_running_loop().call_later(REBIND_WAIT, self.pending.clear)

    def adopt_orphans(self, stored: list[tuple[dict, int, int]]) -> None:
        """Go on with the sessions of a hub that died, from the service manager's fd store.
        Their processes are no longer children of this one: a pidfd tells when each ends."""
        for meta, master, ring_fd in stored:
            try:
                ring = Ring.attach(ring_fd)
            except (OSError, ValueError) as exc:
                log.warning("PTY %s: its stored scrollback is unreadable (%s); not adopted",
                            meta["session_id"], exc)
                os.close(master)
                os.close(ring_fd)
                continue
            if meta["session_id"] in self.sessions:
                os.close(master)
                ring.close()
                continue
            cols, rows = _get_winsize(master)
            entry = {"session_id": meta["session_id"], "pid": meta["pid"],
                     "command": meta["command"], "script": meta.get("script"),
                     "exit_status": None, "cols": cols, "rows": rows, "eof": False,
                     "cli_path": meta.get("cli_path")}
            session = self._adopt(entry, master, ring)
            os.set_blocking(master, False)
            _watch_orphan(session, meta["start"])
            self._resume(session)

    def _adopt(self, entry: dict, master: int, ring: Ring) -> "PtySession":
        session = PtySession(self, entry["session_id"], master, None, ring)
        session.pid = entry["pid"]
        session.command = entry["command"]
        session.script = entry["script"]
        session.exit_status = entry["exit_status"]
        session.sizes.last_cols, session.sizes.last_rows = entry["cols"], entry["rows"]
        session.eof = entry["eof"]
        if entry.get("cli_path") and self.cli is not None:
            try:
                session.cli_path = self.cli.open(session.id, entry["cli_path"])
            except (OSError, ValueError) as exc:
                log.warning("PTY %s: its CLI bridge socket could not be opened again: %s",
                            session.id, exc)
        session.started = asyncio.get_running_loop().create_future()
        session.started.set_result(None)
        self.sessions[session.id] = session
        return session

    @staticmethod
    def _resume(session: "PtySession") -> None:
        if session.input:
            session.pump_scheduled = True
            asyncio.get_running_loop().call_soon(session._pump_input)
        session._arm_idle()
        session.read_here()

    def expects_worker(self, worker: str) -> bool:
        return any(key[0] == worker for key in self.pending)

    def rebind(self, worker: str, remote_peer: int, peer: int) -> None:
        """A worker that served attachments before an upgrade is back: its connection's
        attachments go on where they were, with the output they missed meanwhile."""
        for session_id, sent, entry in self.pending.pop((worker, remote_peer), ()):
            session = self.sessions.get(session_id)
            if session is None or session.ended:
                continue
            att = Attachment(session, entry["attachment_id"], entry["token"], peer,
                             entry["cols"], entry["rows"], entry["seq_ack"], entry["ext"],
                             entry["wants_exit_status"])
            att.next_seq, att.acked = entry["next_seq"], entry["acked"]
            session.attachments[att.id] = att
            session.sizes.set(att.id, att.cols, att.rows, persistent=True)
            if session.idle_timer is not None:
                session.idle_timer.cancel()
                session.idle_timer = None
            offset, missed = session.ring.read(sent)
            for i in range(0, len(missed), REPLAY_CHUNK):
                self._send(att, att.data_event(b64(missed[i:i + REPLAY_CHUNK]), offset + i))
            session.consider_lease()


REBIND_WAIT = 10.0
"""Seconds an upgraded hub keeps the attachments of workers that have not come back."""
STATE_VERSION = 1
"""The shape of the state one image of the hub hands the next; bumped on any change."""


def check_state(state: dict, nfds: int) -> None:
    """Refuse a state this code does not know, before anything is adopted (the pre-flight
    check of an upgrade runs this in the new code)."""
    if type(state) is not dict or state.get("state_version") != STATE_VERSION:
        raise ValueError(f"hub state version {state.get('state_version')!r} is not "
                         f"{STATE_VERSION}, the one this code knows")
    for entry in state["sessions"]:
        for key, kind in (("session_id", str), ("pid", int), ("command", str), ("master", int),
                          ("ring", int), ("cols", int), ("rows", int), ("eof", bool),
                          ("exited", bool), ("input", list), ("attachments", list),
                          ("sent", int)):
            if type(entry.get(key)) is not kind:
                raise ValueError(f"hub state: session entry without a valid {key}")
        if not (0 <= entry["master"] < nfds and 0 <= entry["ring"] < nfds):
            raise ValueError("hub state: a session names an fd that was not handed over")


def _reaped(pid: int, code: int, session: PtySession) -> None:
    session._process_exited(code)


def _watch_orphan(session: PtySession, start: int) -> None:
    """Learn when a process that is not our child ends. The pidfd is opened before the
    start time is compared, so it cannot name a later process that reused the pid."""
    try:
        pidfd = os.pidfd_open(session.pid)
    except OSError:
        session._process_exited()
        return
    if process_start(session.pid) != start:
        os.close(pidfd)
        session._process_exited()
        return
    loop = asyncio.get_running_loop()

    def ended() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        session._process_exited()

    loop.add_reader(pidfd, ended)
