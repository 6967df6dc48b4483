"""The authenticated client: dial, handshake, then RPC; asyncio first, with a sync wrapper.

Addresses: `cmux://host:port`, `host:port`, `[v6]:port`, `unix:///path` or a bare `/path`,
`ssh://[user@]host[:port]` (see cmuxd.ssh_transport), or the name of a host in cmux.json
(see cmuxd.fleet), which brings that host's credentials. Any other host name given
without a port is looked up as a `_cmux._tcp` SRV record first (see cmuxd.srv), then
dialed on port 5555.
TCP always runs the mutual relay handshake, so a server that cannot prove it holds the
token is refused before any request is sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import os
import socket
import threading
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from .auth import (
    PREAUTH_TIMEOUT,
    ERROR_BUSY,
    AuthError,
    ClientHandshake,
    Credentials,
    NoRelayIdError,
    client_credentials,
    short_hostname,
)
from .config import DEFAULT_PORT
from .peercred import peer_uid
from .protocol import OVERSIZED, FrameDecoder
from .ssh_transport import SshProcess

DIAL_TIMEOUT = 2.0

# Exit codes the CLI uses, so scripts can tell failures apart.
EXIT_RPC_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_TIMEOUT = 5


class ClientError(Exception):
    """A connection-level failure; `exit_code` is what the CLI exits with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RemoteError(Exception):
    """The daemon answered a request with an error."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Address:
    kind: str  # "tcp", "unix" or "ssh"
    host: str = ""
    port: int = 0  # for ssh, 0 leaves the port to the user's ssh config
    path: str = ""
    user: str = ""  # ssh only
    # Set when the address came from cmux.json: the host's name there and its credentials.
    name: str = field(default="", compare=False)
    relay_id: str | None = field(default=None, compare=False)
    token_file: str | None = field(default=None, compare=False)
    device_key: str | None = field(default=None, compare=False)
    known_hosts: str | None = field(default=None, compare=False)
    # A host name given without a port: its SRV records say where to dial (else `port`).
    srv: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.kind == "ssh":
            user = f"{self.user}@" if self.user else ""
            return f"ssh://{user}{host}" + (f":{self.port}" if self.port else "")
        return f"cmux://{host}:{self.port}"

    @property
    def is_local(self) -> bool:
        if self.kind == "unix" or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_address(text: str) -> Address:
    text = text.strip()
    if text.startswith("unix://"):
        path = text[len("unix://"):]
        if not path.startswith("/"):
            raise ClientError(f"{text!r}: a unix:// address needs an absolute path", EXIT_USAGE)
        return Address("unix", path=path)
    if text.startswith("/") or text.startswith("~"):
        return Address("unix", path=os.path.expanduser(text))
    ssh = text.startswith("ssh://")
    rest = text[len("cmux://"):] if text.startswith("cmux://") else text
    rest = rest.removeprefix("ssh://").rstrip("/")
    user = ""
    if ssh:
        user, at, rest = rest.rpartition("@")
        if at and not user:
            raise ClientError(f"{text!r}: no user before the @", EXIT_USAGE)
        if "/" in rest:
            raise ClientError(f"{text!r}: an ssh address is ssh://[user@]host[:port]",
                              EXIT_USAGE)
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep:
            raise ClientError(f"{text!r}: unbalanced [ in the address", EXIT_USAGE)
        port_text = tail[1:] if tail.startswith(":") else ""
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    elif ":" in rest:
        host, port_text = rest, ""  # a bare IPv6 literal
    else:
        host, port_text = rest, ""
    if not host:
        raise ClientError(f"{text!r}: no host in the address", EXIT_USAGE)
    if not port_text and ":" not in host and not ssh:
        entry = _fleet_entry(host)
        if entry is not None:
            return fleet_address(entry)
    try:
        port = int(port_text) if port_text else (0 if ssh else DEFAULT_PORT)
    except ValueError:
        raise ClientError(f"{text!r}: the port must be a number", EXIT_USAGE) from None
    if not 1 <= port <= 65535 and not (ssh and not port_text):
        raise ClientError(f"{text!r}: the port must be between 1 and 65535", EXIT_USAGE)
    if ssh:
        return Address("ssh", host=host, port=port, user=user)
    return Address("tcp", host=host, port=port, srv=not port_text and _is_dns_name(host))


def _is_dns_name(host: str) -> bool:
    """Whether a host could have SRV records: not an IP literal, not localhost (RFC 6761
    keeps that name out of DNS)."""
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def _fleet_entry(name: str):
    """The one place a client address meets cmux.json: a bare name (no port) found there."""
    from .fleet import FleetError, lookup_host

    try:
        return lookup_host(name)
    except FleetError as exc:
        raise ClientError(str(exc), EXIT_USAGE) from None


def fleet_address(entry) -> Address:
    """The address of a cmux.json host, carrying the relay id and token file it names."""
    address = parse_address(entry.uri)
    return replace(address, name=entry.name, relay_id=entry.relay_id,
                   token_file=entry.token_file, device_key=entry.device_key,
                   known_hosts=entry.known_hosts)


def credentials_for(address: Address, token_file=None, relay_id=None) -> Credentials:
    """Find credentials as cmux clients do; flags win over what cmux.json says of the host,
    and for a daemon on this host the relay id defaults to the short host name, which is the
    daemon's own default."""
    if token_file is None and address.token_file is None and address.kind == "tcp":
        device = device_credentials(address, relay_id)
        if device is not None:
            return device
    from_fleet = []
    if token_file is None and address.token_file is not None:
        token_file = address.token_file
        from_fleet.append(("--token-file ", f"cmux.json's {address.name} entry: "))
    if relay_id is None and address.relay_id is not None:
        relay_id = address.relay_id
        from_fleet.append(("--relay-id", f"cmux.json's {address.name} entry"))
    try:
        creds = client_credentials(address.port or None, token_file, relay_id)
        for flag, origin in from_fleet:
            creds = replace(creds, source=creds.source.replace(flag, origin))
        return creds
    except AuthError as exc:
        if relay_id is None and address.is_local and not os.environ.get("CMUX_RELAY_ID"):
            try:
                creds = client_credentials(address.port or None, token_file,
                                           short_hostname())
                return replace(creds, source=creds.source.replace(
                    "relay id from --relay-id", "relay id from the host name (the daemon's "
                    "default)"))
            except AuthError:
                pass
        if isinstance(exc, NoRelayIdError) and address.kind == "tcp" and not address.name \
                and not _is_ip_literal(address.host):
            from .fleet import fleet_path

            raise ClientError(
                f"{address.host} is not a host in {fleet_path()}, so nothing says which relay "
                "id its daemon announces; add it there (`cmuxd-remote fleet config`), or pass "
                "--relay-id (a daemon's default is its short host name)", EXIT_AUTH) from None
        raise ClientError(str(exc), EXIT_AUTH) from None


def device_credentials(address: Address, relay_id=None) -> Credentials | None:
    """This device's key, when a host key is pinned (`device trust`) for the address: as the
    cmux.json name, HOST:PORT or HOST; None when none is."""
    from .auth import DeviceCredential
    from .devices import device_key_path, known_hosts_path, load_key, read_pins

    key_path = Path(address.device_key) if address.device_key else device_key_path()
    pins_path = Path(address.known_hosts) if address.known_hosts else known_hosts_path()
    try:
        pins = read_pins(pins_path)
        pin = next((pins[k] for k in (address.name, f"{address.host}:{address.port}",
                                      address.host) if k in pins), None)
        if pin is None:
            if address.device_key:
                raise ClientError(f"cmux.json's {address.name} entry names the device key, but "
                                  f"{pins_path} pins no key for {address.name}; run "
                                  "`cmuxd-remote device trust` for it", EXIT_AUTH)
            return None
        key = load_key(key_path, "device key", "cmuxd-remote device key")
    except AuthError as exc:  # a device file that is unsafe or damaged, as for a token
        raise ClientError(str(exc), EXIT_AUTH) from None
    return Credentials(relay_id or pin.relay_id, b"",
                       f"device key {key_path}, host key pinned for {pin.host} in "
                       f"{pins_path}", device=DeviceCredential(key, pin.key))


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class AsyncClient:
    """One authenticated connection; requests are matched to responses by id, events queue."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 address: Address, leftover: bytes = b"", ssh: SshProcess | None = None):
        self.reader = reader
        self.writer = writer
        self.address = address
        self.events: asyncio.Queue = asyncio.Queue()
        self._ids = itertools.count(1)
        self._waiting: dict[Any, asyncio.Future] = {}
        self._decoder = FrameDecoder()
        self._pump: asyncio.Task | None = None
        self._initial = leftover
        self.ssh = ssh
        self.closed = False
        self.last_heard = asyncio.get_running_loop().time()
        """When the daemon last sent anything, so a silent link can be told from a live one."""

    @classmethod
    async def connect(cls, target: str | Address, *, creds: Credentials | None = None,
                      token_file=None, relay_id=None, unix_auth: bool = False,
                      remote_command: str | None = None, first_request: bytes = b"",
                      raw: bool = False, interactive: bool = True) -> "AsyncClient":
        """Dial and authenticate. `first_request` may carry one request frame that is sent
        together with the auth line (it is only processed if the daemon accepts us). With
        `raw`, no response pump starts: the caller reads `reader` itself. Over ssh,
        `remote_command` is the far side's cmuxd-remote, and the connection is ready once the
        far side answers `hello`, however long ssh takes to ask for a password; without
        `interactive` (the terminal is raw) ssh must not ask, and fails instead."""
        address = target if isinstance(target, Address) else parse_address(target)
        if address.kind == "ssh":
            return await cls._connect_ssh(address, remote_command, first_request, raw,
                                          interactive)
        candidates = await _srv_candidates(address)
        needs_auth = address.kind == "tcp" or unix_auth
        if needs_auth and creds is None:
            creds = credentials_for(candidates[0], token_file, relay_id)
        for attempt in range(BUSY_ATTEMPTS):
            reader, writer, address = await _dial_any(candidates)
            try:
                if address.kind == "unix":
                    _check_unix_peer(writer.get_extra_info("socket"), address)
                leftover = b""
                if needs_auth:
                    leftover = await _handshake(reader, writer, creds, address, first_request)
                elif first_request:
                    writer.write(first_request)
                break
            except DaemonBusy:
                # A daemon that had no room for us says so: try again in a moment, as it asks.
                writer.close()
                if attempt == BUSY_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(BUSY_WAIT * 2 ** attempt)
            except BaseException:
                writer.close()
                raise
        client = cls(reader, writer, address, leftover)
        if not raw:
            client._pump = asyncio.get_running_loop().create_task(client._read_loop())
        return client

    @classmethod
    async def _connect_ssh(cls, address: Address, remote_command: str | None,
                           first_request: bytes, raw: bool, interactive: bool) -> "AsyncClient":
        try:
            ssh = await SshProcess.start(address.host, address.user, address.port,
                                         remote_command, interactive)
        except FileNotFoundError:
            raise ClientError(f"{address}: there is no ssh on PATH; install the OpenSSH "
                              "client", EXIT_UNREACHABLE) from None
        client = cls(ssh.process.stdout, ssh.process.stdin, address, ssh=ssh)
        if first_request:
            client.writer.write(first_request)
        if raw:
            return client
        client._pump = asyncio.get_running_loop().create_task(client._read_loop())
        try:
            await client.rpc("hello", timeout=None)
        except BaseException:
            await client.close()
            raise
        return client

    async def _read_loop(self) -> None:
        lost = f"{self.address}: the daemon closed the connection"
        try:
            if self._initial:
                self._dispatch(self._decoder.feed(self._initial))
            while True:
                data = await self.reader.read(262144)
                self.last_heard = asyncio.get_running_loop().time()
                if not data:
                    self._dispatch(self._decoder.eof())
                    break
                self._dispatch(self._decoder.feed(data))
            if self.ssh is not None:
                lost = f"{self.address}: {await self.ssh.why_closed()}"
        except OSError:
            pass
        except orjson.JSONDecodeError:
            lost = (f"{self.address}: the far side sent something that is not the cmux "
                    "protocol; over ssh, make sure the remote shell's startup files print "
                    "nothing")
            self.writer.close()
        finally:
            self.closed = True
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ClientError(lost, EXIT_UNREACHABLE))
            self._waiting.clear()
            self.events.put_nowait(None)

    def _dispatch(self, frames) -> None:
        for frame in frames:
            if frame is OVERSIZED or not frame:
                continue
            msg = orjson.loads(frame)
            if "event" in msg:
                self.events.put_nowait(msg)
                continue
            fut = self._waiting.pop(_id_key(msg.get("id")), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def send(self, method: str, params: dict | None = None, *, id: Any = None) -> asyncio.Future:
        """Send one request; the future resolves to the whole response object."""
        if id is None:
            id = next(self._ids)
        request = {"id": id, "method": method}
        if params:
            request["params"] = params
        fut = asyncio.get_running_loop().create_future()
        if self.closed:
            fut.set_exception(ClientError(f"{self.address}: the connection is closed",
                                          EXIT_UNREACHABLE))
            return fut
        self._waiting[_id_key(id)] = fut
        self.writer.write(orjson.dumps(request, option=orjson.OPT_APPEND_NEWLINE))
        return fut

    async def rpc(self, method: str, params: dict | None = None, *,
                  timeout: float | None = 30.0) -> dict:
        """Call a method; returns its result or raises RemoteError."""
        fut = self.send(method, params)
        try:
            response = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise ClientError(f"{self.address}: no answer to {method} within {timeout} s",
                              EXIT_TIMEOUT) from None
        if response.get("ok"):
            return response.get("result", {})
        error = response.get("error") or {}
        raise RemoteError(error.get("code", "unknown"), error.get("message", ""))

    async def next_event(self, timeout: float | None = None) -> dict | None:
        return await asyncio.wait_for(self.events.get(), timeout)

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass
        if self.ssh is not None:
            await self.ssh.close()


def _id_key(value: Any) -> Any:
    return orjson.dumps(value)


async def _srv_candidates(address: Address) -> list[Address]:
    """Where to dial, in order: a port-less host name's SRV targets, else the address."""
    if not address.srv:
        return [address]
    from . import srv

    found = await srv.lookup(address.host)
    return [Address("tcp", host=host, port=port) for host, port in found] or [
        replace(address, srv=False)]


async def _dial_any(candidates: list[Address]):
    """The first candidate that answers (RFC 2782: try the targets in turn); the first
    failure when none does, since that is the preferred target's."""
    first_error = None
    for address in candidates:
        try:
            return (*await _dial(address), address)
        except ClientError as exc:
            first_error = first_error or exc
    raise first_error


async def _dial(address: Address):
    try:
        if address.kind == "unix":
            return await asyncio.wait_for(asyncio.open_unix_connection(address.path),
                                          DIAL_TIMEOUT)
        return await asyncio.wait_for(
            asyncio.open_connection(address.host, address.port, limit=1 << 22), DIAL_TIMEOUT)
    except TimeoutError:
        raise ClientError(f"{address}: no answer within {DIAL_TIMEOUT:.0f} s; is the host up "
                          "and the port reachable?", EXIT_TIMEOUT) from None
    except socket.gaierror as exc:
        raise ClientError(f"{address}: unknown host ({exc.strerror})", EXIT_UNREACHABLE) from None
    except FileNotFoundError:
        raise ClientError(f"{address}: no such socket; is the daemon running?",
                          EXIT_UNREACHABLE) from None
    except ConnectionRefusedError:
        raise ClientError(f"{address}: connection refused; is the daemon running and "
                          "listening there?", EXIT_UNREACHABLE) from None
    except OSError as exc:
        raise ClientError(f"{address}: {exc.strerror or exc}", EXIT_UNREACHABLE) from None


BUSY_ATTEMPTS = 4
BUSY_WAIT = 0.05
"""Seconds before the first new attempt at a daemon that said it was busy; doubling."""


class DaemonBusy(ClientError):
    """The daemon had no room for our handshake (not a verdict on the credentials)."""


async def _handshake(reader, writer, creds: Credentials, address: Address,
                     first_request: bytes) -> bytes:
    hs = ClientHandshake(creds.token, creds.relay_id, device=creds.device)
    try:
        async with asyncio.timeout(PREAUTH_TIMEOUT):
            while hs.state in ("waiting_challenge", "sent"):
                data = await reader.read(65536)
                if not data:
                    hs.eof()
                    break
                hs.feed(data)
                if hs.to_send:
                    writer.write(hs.to_send + first_request)
                    hs.to_send = None
    except TimeoutError:
        raise ClientError(f"{address}: the relay handshake did not finish within "
                          f"{PREAUTH_TIMEOUT:.0f} s", EXIT_TIMEOUT) from None
    except OSError as exc:
        raise ClientError(f"{address}: connection lost during the handshake "
                          f"({exc.strerror or exc})", EXIT_UNREACHABLE) from None
    if hs.state == "unavailable":
        raise (DaemonBusy if hs.error == ERROR_BUSY else ClientError)(
            f"{address}: {hs.error}", EXIT_UNREACHABLE)
    if hs.state != "accepted":
        raise ClientError(f"{address}: {hs.error} (credentials: {creds.source})", EXIT_AUTH)
    return hs.leftover


def _check_unix_peer(sock: socket.socket, address: Address) -> None:
    """A Unix socket owned by another user could be anyone's; refuse it as cmux does."""
    uid = peer_uid(sock)
    if uid not in (os.geteuid(), 0):
        raise ClientError(f"{address}: the socket belongs to uid {uid}, not to you; refusing it",
                          EXIT_AUTH)


class Client:
    """Blocking wrapper over AsyncClient for scripts and tests."""

    def __init__(self, target: str | Address, **kwargs):
        self._runner = asyncio.Runner()
        self._client: AsyncClient = self._runner.run(AsyncClient.connect(target, **kwargs))

    @property
    def address(self) -> Address:
        """The address dialed: for a host name given without a port, the SRV target."""
        return self._client.address

    def rpc(self, method: str, params: dict | None = None, *, timeout: float = 30.0) -> dict:
        return self._runner.run(self._client.rpc(method, params, timeout=timeout))

    def request(self, method: str, params: dict | None = None, *, timeout: float = 30.0) -> dict:
        """The whole response object, errors included."""
        async def call() -> dict:
            return await asyncio.wait_for(self._client.send(method, params), timeout)

        return self._runner.run(call())

    def next_event(self, timeout: float = 10.0) -> dict | None:
        return self._runner.run(self._client.next_event(timeout))

    def close(self) -> None:
        try:
            self._runner.run(self._client.close())
        finally:
            self._runner.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def bridge_stdio(target: str | Address, **kwargs) -> int:
    """Carry stdin to the daemon and the daemon's bytes to stdout, unchanged: a drop-in for
    `ssh host cmuxd-remote serve --stdio`. Ends when the daemon closes; stdin EOF half-closes
    so every answer still arrives. Plain blocking fds, so files, pipes and ttys all work."""
    client = await AsyncClient.connect(target, raw=True, **kwargs)
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue = asyncio.Queue(maxsize=16)

    def read_stdin() -> None:
        while True:
            try:
                data = os.read(0, 262144)
            except OSError:
                data = b""
            asyncio.run_coroutine_threadsafe(chunks.put(data), loop).result()
            if not data:
                return

    async def upstream() -> None:
        while data := await chunks.get():
            client.writer.write(data)
            await client.writer.drain()
        if client.writer.can_write_eof():
            client.writer.write_eof()

    def write_stdout(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]

    threading.Thread(target=read_stdin, name="stdin", daemon=True).start()
    up = loop.create_task(upstream())
    try:
        write_stdout(client._initial)
        while data := await client.reader.read(262144):
            write_stdout(data)
    except OSError as exc:
        raise ClientError(f"{client.address}: connection lost ({exc.strerror or exc})",
                          EXIT_UNREACHABLE) from None
    finally:
        up.cancel()
        await client.close()
    return 0


async def ping_series(target: str | Address, count: int, interval: float, report, **kwargs):
    """Connect once, then `count` sequential pings; `report(seq, rtt_ms)` after each.
    Returns (connect_ms, [rtt_ms…])."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    client = await AsyncClient.connect(target, **kwargs)
    connect_ms = (loop.time() - started) * 1000
    rtts = []
    try:
        for seq in range(1, count + 1):
            t0 = loop.time()
            await client.rpc("ping", timeout=PREAUTH_TIMEOUT)
            rtt = (loop.time() - t0) * 1000
            rtts.append(rtt)
            report(seq, rtt)
            if seq < count and interval > 0:
                await asyncio.sleep(interval)
    finally:
        await client.close()
    return connect_ms, rtts
