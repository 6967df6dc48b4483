"""`attach`: this terminal joined to a PTY session, across dropped connections.

The terminal stays raw while the link is down; a status line on the bottom row counts the
seconds, and the client dials again with a back-off capped at 1 s. A reattach resumes the
output from the absolute offset after the last byte shown (`ext_resume_from`, spec §6.8), so
nothing is shown twice and nothing is lost while the ring still holds it, and it uses
`require_existing` and compares `ext_incarnation`, so a session that ended, or was started
anew under the same name, is reported and never joined in its place.

Input reaches the session at most once. Keystrokes are sequenced writes that the daemon
acknowledges once they are written to the PTY; what was sent but not acknowledged when the
link dropped may or may not have arrived, so it is never sent again (a notice says so), and
the dead connection is reset rather than closed, so the kernel does not deliver it later.
Every attachment gets a fresh token under the same attachment id: the reattach supersedes
the old attachment, and a stray write of the old connection is refused from then on.
Keystrokes typed while disconnected are held (up to HELD_INPUT bytes) and sent after the
reattach, unless something sent before the drop was in doubt: typed blind on top of input
that may be missing, they could run something else, so they are dropped with the notice.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import socket
import struct
import sys
import termios
import tty
from collections import deque

import orjson

from .client import (
    EXIT_AUTH,
    EXIT_RPC_ERROR,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Address,
    AsyncClient,
    ClientError,
    RemoteError,
    parse_address,
)

DETACH_KEY = b"\x1d"  # Ctrl-]
HELD_INPUT = 4096
"""Bytes typed while disconnected that are kept for the reattach; more are dropped."""
BACKOFF_FIRST, BACKOFF_CAP = 0.1, 1.0
"""Seconds between reconnect attempts: doubling from the first, never more than the cap."""
ATTEMPTS_IN_FLIGHT = 3
"""Attempts overlap, so one stuck on a lost SYN never holds up the next: a path that comes
back is tried within BACKOFF_CAP."""
ATTEMPT_TIMEOUT = ATTEMPTS_IN_FLIGHT * BACKOFF_CAP
HEARTBEAT = 1.0
"""Seconds of silence from the daemon before the client pings it."""
LINK_TIMEOUT = 3.0
"""Seconds of silence, pings unanswered, after which the link counts as dropped."""


class SessionReplaced(Exception):
    """The session name now runs another incarnation than the one this terminal showed."""


class OutputCursor:
    """Where the screen is in the session's output: the incarnation it shows, and the
    absolute offset one past the last byte shown."""

    def __init__(self) -> None:
        self.incarnation: str | None = None
        self.offset = 0

    def ready(self, incarnation: str, offset: int) -> int:
        """An attachment starts its replay at `offset`; the bytes skipped since the last
        one shown (what the ring no longer held), 0 on the first attachment."""
        if self.incarnation is None:
            self.incarnation, self.offset = incarnation, offset
            return 0
        if incarnation != self.incarnation:
            raise SessionReplaced(incarnation)
        gap = max(0, offset - self.offset)
        self.offset += gap
        return gap

    def data(self, offset: int, data: bytes) -> bytes:
        """What of a pty.data starting at `offset` has not been shown yet."""
        fresh = data[max(0, self.offset - offset):]
        self.offset = max(self.offset, offset + len(data))
        return fresh


class InputLedger:
    """Input at most once (see the module's docstring): sequence numbers of the current
    attachment, writes not yet acknowledged, and what was typed while disconnected."""

    def __init__(self, limit: int = HELD_INPUT) -> None:
        self.limit = limit
        self.next_seq = 1
        self.unacked: deque[tuple[int, int]] = deque()  # (seq, bytes)
        self.in_doubt = 0
        self.held = bytearray()
        self.overflow = 0

    def sent(self, size: int) -> int:
        """The seq of a write of `size` bytes about to go out."""
        seq = self.next_seq
        self.next_seq += 1
        self.unacked.append((seq, size))
        return seq

    def acked(self, seq: int) -> None:
        while self.unacked and self.unacked[0][0] <= seq:
            self.unacked.popleft()

    def lost(self) -> None:
        """The link dropped: unacknowledged writes are in doubt, never to be sent again."""
        self.in_doubt += sum(size for _, size in self.unacked)
        self.unacked.clear()
        self.next_seq = 1

    def hold(self, data: bytes) -> None:
        kept = data[:self.limit - len(self.held)]
        self.held += kept
        self.overflow += len(data) - len(kept)

    def resume(self) -> tuple[bytes, str]:
        """On a new attachment: the held input to send, and a notice ("" when there is
        nothing to say)."""
        held, self.held = bytes(self.held), bytearray()
        said = []
        if self.in_doubt:
            said.append(f"input typed just before the link dropped ({_bytes(self.in_doubt)}) "
                        "may or may not have reached the session and was not sent again")
            if held:
                said.append(f"input typed while reconnecting ({_bytes(len(held) + self.overflow)})"
                            " was dropped; check the screen and type it again")
            held = b""
        elif self.overflow:
            said.append(f"input typed while reconnecting beyond {_bytes(self.limit)} "
                        f"({_bytes(self.overflow)}) was dropped; type it again")
        self.in_doubt = self.overflow = 0
        return held, "; ".join(said)


def _bytes(n: int) -> str:
    return "1 byte" if n == 1 else f"{n} bytes"


def host_label(address: Address) -> str:
    """How the status line names the daemon: its cmux.json name, else its host or path."""
    return address.name or address.host or address.path


class _Outcome(Exception):
    """How an attach ends: the exit code and the words after `[…: session NAME]`."""

    def __init__(self, code: int, how: str):
        super().__init__(how)
        self.code = code
        self.how = how


class TerminalAttach:
    """One `attach` run: the terminal, the current connection (None while reconnecting),
    the output cursor and the input ledger."""

    def __init__(self, address: Address, session_id: str, command: str, connect_kwargs: dict):
        self.address = address
        self.label = host_label(address)
        self.session_id = session_id
        self.command = command
        self.connect_kwargs = connect_kwargs
        # One id for the whole run, so each reattach supersedes the last; random, so another
        # machine's `attach` with the same pid never supersedes this one.
        self.attachment_id = f"cli-{os.getpid()}-{secrets.token_hex(4)}"
        self.token = ""
        self.client: AsyncClient | None = None
        self.resumable = False
        self.cursor = OutputCursor()
        self.ledger = InputLedger()
        self.loop = asyncio.get_running_loop()
        self.detached = self.loop.create_future()

    @property
    def ident(self) -> dict:
        return {"session_id": self.session_id, "attachment_id": self.attachment_id,
                "client_attachment_token": self.token}

    async def run(self) -> int:
        # The first connection is made before raw mode, so ssh can ask for a password.
        await self._attach(await AsyncClient.connect(self.address, **self.connect_kwargs),
                           first=True)
        saved = termios.tcgetattr(0) if os.isatty(0) else None
        try:
            if saved is not None:
                tty.setraw(0)
                self.loop.add_signal_handler(signal.SIGWINCH, self._on_winch)
            self.loop.add_reader(0, self._on_key)
            while True:
                await self._serve()
                await self._reconnect()
        except _Outcome as outcome:
            code, how = outcome.code, outcome.how
        finally:
            self.loop.remove_reader(0)
            if saved is not None:
                self.loop.remove_signal_handler(signal.SIGWINCH)
                termios.tcsetattr(0, termios.TCSADRAIN, saved)
            if self.client is not None:
                await self.client.close()
        print(f"\r\n[{how}: session {self.session_id}]", file=sys.stderr)
        return code

    # one attachment

    async def _attach(self, client: AsyncClient, first: bool = False) -> None:
        """Attach on a connected client and take its pty.ready; the connection is this
        run's from then on."""
        self.token = secrets.token_hex(16)
        cols, rows = _terminal_size()
        params = dict(self.ident, cols=cols, rows=rows, ext_exit_status=True,
                      input_seq_ack=True, ext_resume_from=self.cursor.offset)
        if first:
            if self.command:
                params["command"] = self.command
        else:
            params["require_existing"] = True
        try:
            await client.rpc("pty.attach", params)
            ready = await self._ready(client)
            self.resumable = "ext_incarnation" in ready  # not so on an upstream daemon
            # Zero is left out of events (spec §3.4): a missing offset is 0.
            gap = self.cursor.ready(ready["ext_incarnation"], ready.get("ext_offset", 0)) \
                if self.resumable else 0
        except BaseException:
            await client.close()
            raise
        self.client = client
        subscribe_cli_requests(client)
        if gap:
            self._notice(f"{_bytes(gap)} of output were lost while disconnected, more than "
                         "the daemon's scrollback holds")

    async def _ready(self, client: AsyncClient) -> dict:
        """This attachment's pty.ready, its first event (nothing else is queued before)."""
        try:
            event = await client.next_event(ATTEMPT_TIMEOUT)
        except TimeoutError:
            raise ClientError(f"{self.address}: the attach was not confirmed within "
                              f"{ATTEMPT_TIMEOUT:.0f} s", EXIT_TIMEOUT) from None
        if event is None:
            raise ClientError(f"{self.address}: the daemon closed the connection during the "
                              "attach", EXIT_UNREACHABLE)
        return event

    async def _serve(self) -> None:
        """Show the session until the link drops; an end or a detach raises _Outcome."""
        client = self.client
        events = self.loop.create_task(self._events(client))
        watchdog = self.loop.create_task(self._watch(client))
        try:
            await asyncio.wait([events, watchdog, self.detached],
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            events.cancel()
            watchdog.cancel()
        if self.detached.done():
            await self._detach_politely(client)
            raise _Outcome(0, "detached")
        if events.done() and not events.cancelled() and events.result() is not None:
            raise _Outcome(*exit_code_of(events.result()))
        self.client = None
        self.ledger.lost()
        _reset(client)
        await client.close()
        if not self.resumable:
            raise _Outcome(EXIT_UNREACHABLE, "connection lost; this daemon cannot resume a "
                           "session, attach again")

    async def _events(self, client: AsyncClient) -> dict | None:
        """Output and acks until the link drops (None) or the session ends (its status)."""
        while (event := await client.next_event()) is not None:
            name = event.get("event")
            if name == "cli.request":
                answer_cli_request(client, event)
                continue
            if event.get("attachment_token") != self.token:
                continue
            if name == "pty.data":
                data = base64.b64decode(event["data_base64"])
                _write_out(self.cursor.data(event.get("ext_offset", 0), data)
                           if self.resumable else data)
            elif name == "pty.input_ack":
                self.ledger.acked(event["seq"])
            elif name == "pty.exit":
                return event.get("ext_exit_status") or {}
            elif name == "pty.error":
                _write_out(f"\r\ncmuxd-remote: {event.get('message')}\r\n".encode())
        return None

    async def _watch(self, client: AsyncClient) -> None:
        """Returns when the daemon has been silent for LINK_TIMEOUT, pinged meanwhile."""
        while True:
            await asyncio.sleep(HEARTBEAT / 2)
            silent = self.loop.time() - client.last_heard
            if silent >= LINK_TIMEOUT:
                return
            if silent >= HEARTBEAT:
                client.send("ping").add_done_callback(_ignore_result)

    async def _detach_politely(self, client: AsyncClient) -> None:
        try:
            await client.rpc("pty.detach", self.ident, timeout=HEARTBEAT)
        except (ClientError, RemoteError):
            pass  # the session keeps running either way

    # reconnecting

    async def _reconnect(self) -> None:
        """Dial until an attach succeeds; a detach, a session gone or replaced, or
        credentials refused raise _Outcome."""
        started = self.loop.time()
        status = self.loop.create_task(self._show_status(started))
        attempts: set[asyncio.Task] = set()
        delay = BACKOFF_FIRST
        next_try = started
        try:
            while True:
                if len(attempts) < ATTEMPTS_IN_FLIGHT and self.loop.time() >= next_try:
                    attempts.add(self.loop.create_task(self._dial()))
                    next_try = self.loop.time() + delay
                    delay = min(delay * 2, BACKOFF_CAP)
                wake = max(0.0, next_try - self.loop.time())
                done, _ = await asyncio.wait([*attempts, self.detached], timeout=wake,
                                             return_when=asyncio.FIRST_COMPLETED)
                if self.detached.done():
                    raise _Outcome(0, "detached")
                for attempt in done:
                    attempts.discard(attempt)
                    client = self._connected(attempt)
                    if client is not None and await self._reattach(client):
                        return
        finally:
            for attempt in attempts:
                attempt.cancel()
            for spare in await asyncio.gather(*attempts, return_exceptions=True):
                if isinstance(spare, AsyncClient):  # connected alongside the one used
                    await spare.close()
            status.cancel()
            _write_out(_STATUS_CLEAR)

    async def _dial(self) -> AsyncClient:
        async with asyncio.timeout(ATTEMPT_TIMEOUT):
            return await AsyncClient.connect(self.address, interactive=False,
                                             **self.connect_kwargs)

    def _connected(self, attempt: asyncio.Task) -> AsyncClient | None:
        """The attempt's client, or None to keep trying; refused credentials end the run."""
        exc = attempt.exception()
        if exc is None:
            return attempt.result()
        if isinstance(exc, ClientError) and exc.exit_code in (EXIT_AUTH, EXIT_USAGE):
            raise _Outcome(exc.exit_code, f"could not reconnect: {exc}")
        return None

    async def _reattach(self, client: AsyncClient) -> bool:
        """Whether the session is back; False when the new link failed too."""
        try:
            await self._attach(client)
        except RemoteError as exc:
            if exc.code == "pty_session_not_found":
                raise _Outcome(EXIT_RPC_ERROR, "ended while disconnected; its exit status "
                               "is not known") from None
            raise _Outcome(EXIT_RPC_ERROR, f"could not reattach ({exc.message})") from None
        except SessionReplaced:
            raise _Outcome(EXIT_RPC_ERROR, "replaced by a new session of the same name while "
                           "disconnected; attach again to join the new one") from None
        except (ClientError, OSError):
            return False
        held, notice = self.ledger.resume()
        if notice:
            self._notice(notice)
        if held:
            self._send_input(held)
        return True

    async def _show_status(self, started: float) -> None:
        while True:
            seconds = int(self.loop.time() - started)
            _write_out(_STATUS_SHOW % f"[{self.label}: reconnecting… {seconds} s]".encode())
            await asyncio.sleep(1 - (self.loop.time() - started) % 1)

    # the terminal

    def _on_key(self) -> None:
        data = os.read(0, 65536)
        if not data or DETACH_KEY in data:
            data = data.split(DETACH_KEY, 1)[0]
            if not self.detached.done():
                self.detached.set_result(None)
        if data and not self.detached.done():
            self._send_input(data)

    def _send_input(self, data: bytes) -> None:
        if self.client is None:
            self.ledger.hold(data)
            return
        seq = self.ledger.sent(len(data))
        self.client.writer.write(orjson.dumps({"method": "pty.write", "params": dict(
            self.ident, data_base64=base64.b64encode(data).decode(), seq=seq)}) + b"\n")

    def _on_winch(self) -> None:
        cols, rows = _terminal_size()
        if self.client is not None:
            self.client.writer.write(orjson.dumps({"method": "pty.resize", "params": dict(
                self.ident, cols=cols, rows=rows)}) + b"\n")

    def _notice(self, text: str) -> None:
        _write_out(f"\r\n[{self.label}: {text}]\r\n".encode())


# The status line: save the cursor, draw on the bottom row, restore; cleared the same way.
_STATUS_SHOW = b"\x1b7\x1b[999;1H\x1b[2K%s\x1b8"
_STATUS_CLEAR = _STATUS_SHOW % b""


def _write_out(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


def _terminal_size() -> tuple[int, int]:
    cols, rows = os.get_terminal_size(0) if os.isatty(0) else (0, 0)
    return cols or 80, rows or 24  # a terminal with no size set reports 0x0


def _reset(client: AsyncClient) -> None:
    """Drop what the kernel still holds for a dead connection (SO_LINGER 0): writes that
    were never acknowledged must not reach the daemon after the reattach."""
    sock = client.writer.get_extra_info("socket")
    if sock is not None and sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _ignore_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def attach_terminal(target: str | Address, session_id: str, command: str = "",
                          **kwargs) -> int:
    """Attach the local terminal to a PTY session: raw mode, keystrokes as sequenced
    pty.write, window changes as pty.resize, output to stdout, reconnecting when the link
    drops. Ctrl-] detaches (the session keeps running) and returns 0; the session's end
    returns the process's exit code (128 + the signal for a process killed by one), as a
    shell would report it."""
    address = target if isinstance(target, Address) else parse_address(target)
    return await TerminalAttach(address, session_id, command, kwargs).run()


def exit_code_of(status: dict) -> tuple[int, str]:
    """A pty.exit's `ext_exit_status` as a shell reports it: the code, or 128 + the signal;
    and the words for it. A session that ended with no status (closed, or the daemon's PTY
    hub went away) counts as a success."""
    number, code = status.get("signal"), status.get("code")
    if type(number) is int and 0 < number < 128:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return 128 + number, f"killed by {name}"
    if type(code) is int and 0 <= code <= 255:
        return code, f"exited with {code}"
    return 0, "ended"


MSG_NOT_THE_APP = ("this terminal is attached with cmuxd-remote attach, which is not the cmux "
                   "app: it shows notifications and nothing else; run the command in a "
                   "terminal of the cmux app")


def subscribe_cli_requests(client: AsyncClient) -> None:
    """Ask for cli.request events (spec §6.7); a daemon without the bridge says no, and
    that answer is not worth waiting for."""
    client.send("ext.cli.subscribe").add_done_callback(_unawaited)


def answer_cli_request(client: AsyncClient, event: dict) -> None:
    """A `cmux` CLI inside the session asked the app for something: a notification shows as
    one line on the terminal and is answered as delivered; anything else is refused."""
    import base64
    import binascii

    try:
        request = orjson.loads(base64.b64decode(event.get("data_base64") or ""))
    except (binascii.Error, ValueError):
        request = None
    if type(request) is not dict:
        request = {}
    method = request.get("method")
    params = request.get("params") if type(request.get("params")) is dict else {}
    reply: dict = {"id": request.get("id")}
    if type(method) is str and method.startswith("notification.create"):
        words = [_one_line(params.get(k)) for k in ("title", "subtitle", "body")]
        os.write(2, f"\r\n[notification] {' - '.join(w for w in words if w)}\r\n".encode())
        reply.update(ok=True, result={"delivered": True})
    else:
        reply.update(ok=False, error={"code": "method_not_found", "message": MSG_NOT_THE_APP})
    client.send("cli.response", {
        "request_id": event.get("request_id"),
        "data_base64": base64.b64encode(orjson.dumps(reply)).decode()}).add_done_callback(
            _unawaited)


def _unawaited(fut: asyncio.Future) -> None:
    """A reply nobody waits for: only take its exception (a closed connection) off it."""
    if not fut.cancelled():
        fut.exception()


def _one_line(value) -> str:
    """Text from the session, made safe to print: no escape sequences, no line breaks."""
    if type(value) is not str:
        return ""
    return "".join(c if c.isprintable() else " " for c in value).strip()
