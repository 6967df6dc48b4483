"""Command line: parse with argh, then call the parts that do the work."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket as pysocket
import sys
from typing import NoReturn

import argh
import orjson

from . import __version__
from .auth import AuthError, write_new_token
from .client import (
    EXIT_RPC_ERROR,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    AsyncClient,
    ClientError,
    RemoteError,
    bridge_stdio,
    ping_series,
)
from .config import DEFAULT_PORT, Config, runtime_dir

log = logging.getLogger("cmuxd")

DESCRIPTION = """\
The cmux remote daemon (serve) and its clients (ping, rpc, connect, attach, sessions, kill,
status, fleet).

Exit codes of the client commands: 0 success, 1 the daemon answered with an error,
2 usage, 3 unreachable (refused, unknown host, closed), 4 authentication, 5 timeout."""

URI_HELP = ("cmux://HOST:PORT, HOST:PORT, [IPV6]:PORT (port 5555 when omitted), unix:///PATH, "
            "ssh://[USER@]HOST[:PORT], or a host name from cmux.json")


def client_options(func):
    """The credentials options every client command takes, with one help text each."""
    for flag, text in [
        ("--unix-auth", "run the relay handshake on a Unix socket too"),
        ("--relay-id", "the daemon's relay id (default: cmux.json's entry, the token file's "
                       "relay_id, CMUX_RELAY_ID, or for a daemon on this host its short host "
                       "name)"),
        ("--token-file", "the relay token file (default: cmux.json's entry, CMUX_RELAY_ID + "
                         "CMUX_RELAY_TOKEN, ~/.cmux/relay/PORT.auth, then "
                         "~/.config/cmuxd/relay-token)"),
    ]:
        func = argh.arg(flag, help=text)(func)
    return func


def version() -> None:
    """Print the version and exit."""
    print(__version__)


@argh.arg("--stdio", help="serve one connection on stdin/stdout (what `ssh host cmuxd-remote serve --stdio` runs); with a daemon of this user running, hand stdin and stdout to it")
@argh.arg("--standalone", help="--stdio: serve in-process, never through the running daemon; PTY sessions end with stdin")
@argh.arg("--join", help="--stdio: hand stdin and stdout to the running daemon, else serve in-process (the default)")
@argh.arg("--tcp", action="append", metavar="ADDR", help=":PORT (every address), HOST:PORT, [IPV6]:PORT, or tailscale:PORT (this host's tailnet addresses; tailscale4:, tailscale6: for one family); repeatable")
@argh.arg("--socket", action="append", metavar="PATH", help="a Unix socket path; repeatable")
@argh.arg("--workers", help="worker processes (default: the number of CPUs)")
@argh.arg("--token-file", help="relay token file (default: $CREDENTIALS_DIRECTORY/relay-token, CMUX_RELAY_TOKEN, then ~/.config/cmuxd/relay-token)")
@argh.arg("--relay-id", help="relay id (default: a JSON token file's relay_id, CMUX_RELAY_ID, then the short host name)")
@argh.arg("--unix-auth", choices=["peer", "token"], help="peer: same uid or root pass; token: Unix clients run the relay handshake too")
@argh.arg("--max-handshakes", help="unauthenticated connections in flight at once; when full, the one idle longest from the source holding the most makes room")
@argh.arg("--backoff-failures", help="failed handshakes from one source (an address; a /64 for global IPv6) before it is refused for a while")
@argh.arg("--state-dir", help="where the control, front door and PTY hub sockets live, one daemon's alone; --stdio: the daemon to join (default: $XDG_RUNTIME_DIR/cmuxd, or ~/.local/state/cmux without XDG_RUNTIME_DIR; --stdio: then /run/cmuxd)")
@argh.arg("--shell", help="the shell of PTY sessions started without a command (default: $SHELL, then bash, then sh)")
@argh.arg("--scrollback", help="bytes of output each PTY session keeps for replay")
@argh.arg("--idle-ttl", help="seconds a PTY session with no attachment lives on")
@argh.arg("--no-cli-bridge", help="give PTY sessions no CMUX_SOCKET_PATH bridge: the cmux CLI inside them cannot reach the app over this connection")
@argh.arg("--max-connections", help="open connections at most; past it new ones are refused with a reason")
@argh.arg("--max-connections-served", help="recycle a worker after about this many connections (0: never)")
@argh.arg("--max-worker-rss", help="recycle a worker whose RSS exceeds this many MiB (0: never)")
@argh.arg("--worker-timeout", help="seconds a worker may miss heartbeats before it is killed and replaced")
@argh.arg("--graceful-timeout", help="seconds old workers keep serving open connections after a reload")
@argh.arg("--allow-from", action="append", metavar="NET", help="serve TCP peers only from these networks: tailnet, loopback, an address or a CIDR; repeatable; others are closed before the handshake")
@argh.arg("--external-hub", help="PTY sessions belong to a hub another service runs (`cmuxd-remote hub run`, the cmuxd-hub unit): adopt it, never start one")
@argh.arg("--devices-only", help="TCP clients must sign in with a device key (`device add`); the shared relay token is refused")
def serve(*, stdio: bool = False, tcp: list[str] | None = None, socket: list[str] | None = None,
          workers: int = 0, token_file: str | None = None, relay_id: str | None = None,
          unix_auth: str = "peer", max_handshakes: int = 256, backoff_failures: int = 20,
          state_dir: str = "", max_connections: int = 10000, max_connections_served: int = 0,
          max_worker_rss: int = 0, worker_timeout: float = 10.0,
          graceful_timeout: float = 30.0, allow_from: list[str] | None = None,
          shell: str | None = None, scrollback: int = 1 << 20,
          idle_ttl: float = 86400.0, external_hub: bool = False,
          no_cli_bridge: bool = False, devices_only: bool = False, standalone: bool = False,
          join: bool = False) -> None:
    """Serve the cmux remote protocol. Without --stdio, --tcp or --socket it listens on
    127.0.0.1:5555 and the Unix socket $XDG_RUNTIME_DIR/cmuxd/cmuxd.sock (without
    XDG_RUNTIME_DIR: ~/.local/state/cmux/cmuxd.sock)."""
    if (standalone or join) and not stdio:
        usage_error("--standalone and --join choose how --stdio serves; add --stdio")
    if stdio:
        if tcp or socket:
            usage_error("--stdio serves one pipe; it cannot be combined with --tcp or --socket")
        if standalone and join:
            usage_error("choose one of --standalone (serve in-process) and --join (through "
                        "the running daemon)")
        if scrollback <= 0 or idle_ttl <= 0:
            usage_error("--scrollback and --idle-ttl must be positive")
        if not standalone:
            from .front import join as join_daemon

            status = join_daemon(state_dir or None)
            if status is not None:
                sys.exit(status)
        sys.exit(asyncio.run(_serve_stdio(shell, scrollback, idle_ttl, not no_cli_bridge)))
    from .supervisor import run_daemon
    from .supervisor.listeners import ListenerError, default_socket_path, parse_tcp

    for spec in tcp or []:
        try:
            parse_tcp(spec)
        except ListenerError as exc:
            usage_error(str(exc))
    if not tcp and not socket:
        tcp = [f"127.0.0.1:{DEFAULT_PORT}"]
        socket = [str(default_socket_path())]
    try:
        config = Config(tcp=tcp or [], sockets=socket or [], workers=workers,
                        token_file=token_file, relay_id=relay_id, unix_auth=unix_auth,
                        max_handshakes=max_handshakes, backoff_failures=backoff_failures,
                        state_dir=state_dir, max_connections=max_connections,
                        max_connections_served=max_connections_served,
                        max_worker_rss=max_worker_rss, worker_timeout=worker_timeout,
                        graceful_timeout=graceful_timeout, allow_from=allow_from or [],
                        shell=shell, scrollback=scrollback, idle_ttl=idle_ttl,
                        external_hub=external_hub, cli_bridge=not no_cli_bridge,
                        devices_only=devices_only)
    except ValueError as exc:
        usage_error(str(exc))
    sys.exit(run_daemon(config))


@argh.named("run")
@argh.arg("--state-dir", help="the daemon's --state-dir, where the hub's socket goes (default: $XDG_RUNTIME_DIR/cmuxd, or ~/.local/state/cmux without XDG_RUNTIME_DIR)")
@argh.arg("--shell", help="the shell of PTY sessions started without a command (default: $SHELL, then bash, then sh)")
@argh.arg("--scrollback", help="bytes of output each PTY session keeps for replay")
@argh.arg("--idle-ttl", help="seconds a PTY session with no attachment lives on")
@argh.arg("--no-cli-bridge", help="no CLI bridge socket in sessions (CMUX_SOCKET_PATH)")
def hub_run(*, state_dir: str = "", shell: str | None = None, scrollback: int = 1 << 20,
            idle_ttl: float = 86400.0, no_cli_bridge: bool = False) -> None:
    """Run the PTY hub, the owner of every PTY session, in the foreground: what the
    cmuxd-hub unit runs, so that users' shells live outside the daemon's sandbox and outlive
    its restarts. The daemon (serve --external-hub) adopts it."""
    from .hub_process import main as hub_main

    if scrollback <= 0 or idle_ttl <= 0:
        usage_error("--scrollback and --idle-ttl must be positive")
    config = {"state_dir": state_dir or str(runtime_dir()), "shell": shell,
              "scrollback": scrollback, "idle_ttl": idle_ttl, "cli_bridge": not no_cli_bridge,
              "until_stopped": True}
    hub_main(["--config", orjson.dumps(config).decode()])


@argh.named("stop")
@argh.arg("--state-dir", help="the daemon's --state-dir (default: $XDG_RUNTIME_DIR/cmuxd, or ~/.local/state/cmux without XDG_RUNTIME_DIR)")
def hub_stop(*, state_dir: str = "") -> None:
    """End every PTY session on purpose: the hub hangs up each session's processes (SIGHUP,
    then SIGKILL) and exits. Stopping or restarting the daemon leaves them running."""
    _hub_order(state_dir, "stop", "ordered the PTY hub to end every session")


@argh.named("upgrade")
@argh.arg("--state-dir", help="the daemon's --state-dir (default: $XDG_RUNTIME_DIR/cmuxd, or ~/.local/state/cmux without XDG_RUNTIME_DIR)")
def hub_upgrade(*, state_dir: str = "") -> None:
    """Have the PTY hub re-execute into the code installed now, keeping every session (what
    a reload of the daemon does too)."""
    _hub_order(state_dir, "upgrade", "asked the PTY hub to upgrade in place; `cmuxd-remote "
               "status` shows its version")


def _hub_order(state_dir: str, order: str, done: str) -> None:
    from .hub_link import LINK_VERSION, hub_socket_path
    from .peercred import peer_uid

    path = hub_socket_path(state_dir or str(runtime_dir()))
    sock = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        sock.connect(str(path))
        if peer_uid(sock) != os.getuid():
            fail(f"{path} is served by another user's hub; not talking to it")
        sock.sendall(orjson.dumps({"type": "hello", "version": LINK_VERSION,
                                   "role": "supervisor"}) + b"\n")
        answer = sock.makefile("rb").readline()
        if not answer or orjson.loads(answer).get("type") != "hello":
            fail(f"the PTY hub on {path} does not speak this version's link; stop it with "
                 "SIGTERM (its pid is in `cmuxd-remote status`)")
        sock.sendall(orjson.dumps({"type": order}) + b"\n")
    except (FileNotFoundError, ConnectionRefusedError):
        fail(f"no PTY hub serves {path}: no session is running there", EXIT_UNREACHABLE)
    except OSError as exc:
        fail(f"{path}: {exc.strerror or exc}", EXIT_UNREACHABLE)
    finally:
        sock.close()
    print(done, file=sys.stderr)


async def _serve_stdio(shell: str | None, scrollback: int, idle_ttl: float,
                       cli_bridge: bool) -> int:
    # The one connection owns the hub: its PTY sessions die with stdin (spec §1.2). Its
    # bridge sockets live in a private temporary directory, removed at the end.
    from .connection import serve_stdio
    from .hub import Hub, watch_children_without_threads

    watch_children_without_threads()
    hub = Hub(scrollback=scrollback, idle_ttl=idle_ttl, shell=shell, cli_bridge=cli_bridge)
    try:
        return await serve_stdio(hub)
    finally:
        await hub.shutdown()


@argh.arg("--force", help="replace an existing token (clients holding the old one are refused)")
@argh.arg("--if-missing", help="do nothing when the file exists")
@argh.named("new")
@argh.arg("path", nargs="?", default=None, help="where to write it (default: ~/.config/cmuxd/relay-token)")
def token_new(path: str | None, *, force: bool = False, if_missing: bool = False) -> None:
    """Write a fresh relay token file (0600) and print where it is."""
    from .auth import default_token_path

    target = default_token_path() if path is None else path
    if if_missing and os.path.exists(target):
        print(target)
        return
    try:
        print(write_new_token(target, force=force))
    except AuthError as exc:
        fail(str(exc))


@argh.named("rotate")
@argh.arg("path", nargs="?", default=None, help="the token file to rewrite (default: the one the running daemon reads; under systemd, the file its unit loads, e.g. /etc/cmuxd/relay-token)")
@argh.arg("--grace", help="seconds the old token is still accepted for new connections (0: refused at once)")
@argh.arg("--state-dir", help="the daemon's --state-dir (default: $XDG_RUNTIME_DIR/cmuxd, or ~/.local/state/cmux without XDG_RUNTIME_DIR)")
def token_rotate(path: str | None, *, grace: float = 600.0, state_dir: str = "") -> None:
    """Write a new relay token and make the running daemon use it at once, with no restart;
    open connections and sessions are untouched."""
    import time

    from .token_rotation import RotationError, rotate

    if not 0 <= grace <= 7 * 86400:
        usage_error("--grace must be 0 to 604800 seconds (a week)")
    try:
        done = rotate(Config(state_dir=state_dir).control_path, path, grace)
    except RotationError as exc:
        fail(str(exc), exc.exit_code)
    if done.previous_until:
        until = time.strftime("%H:%M:%S", time.localtime(done.previous_until))
        after = f"the old token is still accepted for new connections until {until}"
    else:
        after = "the old token is refused from now on"
    print(f"rotated the token in {done.path}; the daemon uses the new one now and {after}. "
          "Copy the file to the devices that connect with it.")


STATE_DIR_HELP = ("the daemon's --state-dir (default: $XDG_RUNTIME_DIR/cmuxd, or "
                  "~/.local/state/cmux without XDG_RUNTIME_DIR)")


def _public_line(line: str | None, what: str) -> str:
    """A public line from the argument, else the first line of stdin."""
    if line is None:
        if sys.stdin.isatty():
            sys.stderr.write(f"paste the {what} line, then Enter:\n")
        line = sys.stdin.readline()
    return line.strip()


def _tell_daemon(state_dir: str) -> dict | None:
    """Make the running daemon re-read its devices; None when no daemon answers."""
    from .status import control_request

    try:
        return control_request(Config(state_dir=state_dir).control_path,
                               {"method": "devices_changed"})
    except OSError:
        return None


@argh.named("key")
@argh.arg("--name", help="the label of the public line (default: the short host name)")
def device_key(*, name: str | None = None) -> None:
    """On a device: make its key pair once (the private half stays in
    ~/.config/cmuxd/device-key, 0600) and print its public line for `device add` on a host."""
    from .auth import short_hostname
    from .devices import DEVICE_LINE_TYPE, NAME, device_key_path, key_pair, public_line

    label = name or short_hostname()
    if not NAME.fullmatch(label):
        usage_error("--name must be 1 to 64 letters, digits, dots, dashes or underscores")
    try:
        key = key_pair(device_key_path(), "device key")
    except AuthError as exc:
        fail(str(exc))
    print(public_line(DEVICE_LINE_TYPE, key.public_key(), label))


@argh.named("add")
@argh.arg("name", help="the device's name on this host: 1 to 64 of A-Z a-z 0-9 . _ -")
@argh.arg("line", nargs="?", default=None, help="the line `device key` printed on the device (default: read from stdin)")
@argh.arg("--relay-id", help="the relay id the daemon announces (default: the running daemon's, else the short host name)")
@argh.arg("--state-dir", help=STATE_DIR_HELP)
def device_add(name: str, line: str | None, *, relay_id: str | None = None,
               state_dir: str = "") -> None:
    """On a host: authorize a device's public key, and print this host's public line for
    `device trust` on the device. The running daemon takes it at once."""
    from .auth import short_hostname
    from .devices import (HOST_LINE_TYPE, add_device, authorized_devices_path,
                          host_key_path, key_pair, public_line)

    try:
        device = add_device(authorized_devices_path(), name, _public_line(line, "device's public"))
        host = key_pair(host_key_path(), "host key")
    except AuthError as exc:
        fail(str(exc))
    told = _tell_daemon(state_dir)
    if relay_id is None:
        from .status import query_status

        try:
            relay_id = query_status(Config(state_dir=state_dir).control_path)["relay_id"]
        except (OSError, KeyError):
            relay_id = None
    print(public_line(HOST_LINE_TYPE, host.public_key(), relay_id or short_hostname()))
    note = "the running daemon takes it now" if told is not None else \
        "no daemon answers; it takes the key when it starts"
    sys.stderr.write(f"added device {device.name} ({device.fingerprint}); {note}. On the "
                     "device, run `cmuxd-remote device trust HOST` and paste the line above\n")


@argh.named("trust")
@argh.arg("host", help="the host as you will name it: its cmux.json name, HOST:PORT or HOST")
@argh.arg("line", nargs="?", default=None, help="the line `device add` printed on the host (default: read from stdin)")
def device_trust(host: str, line: str | None) -> None:
    """On a device: pin a host's public key, so that `ping HOST` (and every client command)
    signs in with this device's key and refuses a daemon that cannot prove it holds that key."""
    from .auth import fingerprint
    from .devices import known_hosts_path, pin_host

    try:
        pin = pin_host(known_hosts_path(), host, _public_line(line, "host's public"))
    except AuthError as exc:
        fail(str(exc))
    print(f"pinned host key {fingerprint(pin.key)} (relay {pin.relay_id}) for {pin.host}")


@argh.named("list")
@argh.arg("--json", help="print the devices as JSON")
@argh.arg("--state-dir", help=STATE_DIR_HELP)
def device_list(*, json: bool = False, state_dir: str = "") -> None:
    """On a host: the authorized devices, when each was added and last used, and their
    live connections (from the running daemon)."""
    from .devices import authorized_devices_path, read_authorized, read_last_used
    from .status import control_request, duration
    import time

    try:
        devices = read_authorized(authorized_devices_path())
    except AuthError as exc:
        fail(str(exc))
    try:
        live = control_request(Config(state_dir=state_dir).control_path, {"method": "devices"})
    except OSError:
        live = {"connections": {}, "last_used": read_last_used()}
    rows = []
    for d in devices.values():
        used = live["last_used"].get(d.name) or {}
        rows.append({"name": d.name, "fingerprint": d.fingerprint, "added": d.added,
                     "last_used": used.get("at"), "last_from": used.get("from"),
                     "connections": live["connections"].get(d.name, 0)})
    if json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    now = time.time()
    print(f"{'DEVICE':<20} {'FINGERPRINT':<51} {'ADDED':<8} {'LAST USED':<10} {'FROM':<24} CONNS")
    for r in rows:
        used = f"{duration(now - r['last_used'])} ago" if r["last_used"] else "never"
        print(f"{r['name']:<20} {r['fingerprint']:<51} {duration(now - r['added']):<8} "
              f"{used:<10} {r['last_from'] or '-':<24} {r['connections']}")


@argh.named("revoke")
@argh.arg("name", help="the device to revoke")
@argh.arg("--state-dir", help=STATE_DIR_HELP)
def device_revoke(name: str, *, state_dir: str = "") -> None:
    """On a host: remove a device; the running daemon closes its connections at once and
    refuses its next handshake. Its PTY sessions keep running."""
    from .devices import authorized_devices_path, revoke_device

    try:
        device = revoke_device(authorized_devices_path(), name)
    except AuthError as exc:
        fail(str(exc))
    told = _tell_daemon(state_dir)
    note = "its connections are closed" if told is not None else \
        "no daemon answers, so none had to close its connections"
    print(f"revoked device {device.name} ({device.fingerprint}); {note}")


def _client_kwargs(token_file, relay_id, unix_auth, remote_command):
    return {"token_file": token_file, "relay_id": relay_id, "unix_auth": unix_auth,
            "remote_command": remote_command}


REMOTE_COMMAND_HELP = ("ssh:// only: the far side's cmuxd-remote, when a non-interactive shell "
                       "there does not find it on PATH (default: cmuxd-remote)")


def _run_client(coro) -> int:
    try:
        return asyncio.run(coro)
    except ClientError as exc:
        print(f"cmuxd-remote: {exc}", file=sys.stderr)
        return exc.exit_code
    except RemoteError as exc:
        print(f"cmuxd-remote: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_RPC_ERROR
    except KeyboardInterrupt:
        return 130


@argh.arg("uri", help=URI_HELP)
@client_options
@argh.arg("--remote-command", help=REMOTE_COMMAND_HELP)
@argh.arg("-c", "--count", help="pings to send")
@argh.arg("-i", "--interval", help="seconds between pings")
def ping(uri: str, *, count: int = 4, interval: float = 0.2, token_file: str | None = None,
         relay_id: str | None = None, unix_auth: bool = False,
         remote_command: str | None = None) -> None:
    """Ping a daemon and print round-trip times like ping(8)."""

    def report(seq: int, rtt: float) -> None:
        print(f"pong from {uri}: seq={seq} time={rtt:.3f} ms", flush=True)

    async def go() -> int:
        connect_ms, rtts = await ping_series(
            uri, count, interval, report,
            **_client_kwargs(token_file, relay_id, unix_auth, remote_command))
        print(f"--- {uri} ping statistics ---")
        print(f"connect+auth {connect_ms:.3f} ms, {count} sent, {len(rtts)} received")
        if rtts:
            print(f"rtt min/avg/max = {min(rtts):.3f}/{sum(rtts) / len(rtts):.3f}/{max(rtts):.3f} ms")
        return 0

    sys.exit(_run_client(go()))


@argh.arg("uri", help=URI_HELP)
@client_options
@argh.arg("--remote-command", help=REMOTE_COMMAND_HELP)
@argh.arg("method", help="e.g. hello, ping, session.open")
@argh.arg("params", nargs="?", default=None, help="JSON object of parameters (default: none)")
@argh.arg("--timeout", help="seconds the whole call may take: connect, handshake and answer")
def rpc(uri: str, method: str, params: str | None, *, token_file: str | None = None,
        relay_id: str | None = None, unix_auth: bool = False, timeout: float = 30.0,
        remote_command: str | None = None) -> None:
    """Call one method and print its result as JSON."""
    try:
        parsed = orjson.loads(params) if params else {}
    except orjson.JSONDecodeError as exc:
        print(f"cmuxd-remote: PARAMS is not valid JSON: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if not isinstance(parsed, dict):
        print("cmuxd-remote: PARAMS must be a JSON object", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    async def go() -> int:
        try:
            async with asyncio.timeout(timeout):
                client = await AsyncClient.connect(
                    uri, **_client_kwargs(token_file, relay_id, unix_auth, remote_command))
                try:
                    result = await client.rpc(method, parsed, timeout=None)
                finally:
                    await client.close()
        except TimeoutError:
            raise ClientError(f"{uri}: {method} did not complete within --timeout {timeout:g} s "
                              "(connect, handshake and answer); is the daemon up and not "
                              "overloaded? Raise --timeout for a slow method",
                              EXIT_TIMEOUT) from None
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return 0

    sys.exit(_run_client(go()))


@argh.arg("uri", help=URI_HELP)
@client_options
@argh.arg("--remote-command", help=REMOTE_COMMAND_HELP)
@argh.arg("--stdio", help="bridge stdin/stdout to the daemon (the only mode)")
def connect(uri: str, *, stdio: bool = False, token_file: str | None = None,
            relay_id: str | None = None, unix_auth: bool = False,
            remote_command: str | None = None) -> None:
    """Authenticate, then carry stdin/stdout to the daemon: a drop-in for
    `ssh host cmuxd-remote serve --stdio`."""
    if not stdio:
        usage_error("connect needs --stdio (the stdin/stdout bridge)")
    sys.exit(_run_client(bridge_stdio(
        uri, **_client_kwargs(token_file, relay_id, unix_auth, remote_command))))


@argh.arg("--json", help="print the raw status object")
@argh.arg("--prometheus", help="print the counters in the Prometheus text format (for node_exporter's textfile collector)")
@argh.arg("--state-dir", help="the daemon's --state-dir (default: $XDG_RUNTIME_DIR/cmuxd, or ~/.local/state/cmux without XDG_RUNTIME_DIR)")
def status(*, json: bool = False, prometheus: bool = False, state_dir: str = "") -> None:
    """Show how the running daemon is doing: listeners, workers, counters."""
    from .status import format_status, query_status

    if json and prometheus:
        usage_error("choose one of --json and --prometheus")
    try:
        result = query_status(Config(state_dir=state_dir).control_path)
    except OSError as exc:
        print(f"cmuxd-remote: {exc}", file=sys.stderr)
        sys.exit(3)
    if prometheus:
        from .metrics import prometheus_text

        sys.stdout.write(prometheus_text(result))
    elif json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_status(result))


@argh.named("install")
@argh.arg("--systemd", help="systemd units: cmuxd.socket and cmuxd.service")
@argh.arg("--launchd", help="a launchd LaunchAgent plist (macOS)")
@argh.arg("--user", help="systemd: your own instance (~/.config/systemd/user)")
@argh.arg("--system", help="systemd: the system instance (/etc/systemd/system; needs root)")
@argh.arg("--as", dest="as_user", metavar="USER", help="--system: the account (User=) the daemon and the shells it serves run as (default: SUDO_USER under sudo; --as root only on purpose)")
@argh.arg("--print", dest="print_only", help="write the units to stdout; install nothing, create no token")
@argh.arg("--token-file", help="the relay token the units load (default: ~/.config/cmuxd/relay-token, /etc/cmuxd/relay-token for --system; created when missing)")
@argh.arg("--port", help="the TCP port on loopback (and on the tailnet addresses)")
@argh.arg("--tailnet", help="systemd: also listen on this host's Tailscale addresses (`tailscale ip`); launchd: listen on every address and serve only tailnet and loopback peers (--allow-from)")
@argh.arg("--tailnet-address", action="append", metavar="ADDR", help="systemd: a Tailscale address to listen on; repeatable; implies --tailnet")
@argh.arg("--at-boot", help="systemd --user: start the daemon with your user manager (at login, or at boot with lingering), not only on the first connection; --system units always do")
def units_install(*, systemd: bool = False, launchd: bool = False, user: bool = False,
                  system: bool = False, as_user: str | None = None, print_only: bool = False,
                  token_file: str | None = None, port: int = DEFAULT_PORT,
                  tailnet: bool = False, tailnet_address: list[str] | None = None,
                  at_boot: bool = False) -> None:
    """Install service units: --system ones start the daemon at boot, --user and launchd
    ones on the first connection (or at login: --at-boot, launchd's RunAtLoad)."""
    from . import units

    if systemd == launchd:
        usage_error("choose one of --systemd and --launchd")
    try:
        if systemd:
            if user == system:
                usage_error("choose one of --user and --system")
            addresses = tailnet_address or (units.tailscale_addresses() if tailnet else [])
            plan = units.systemd_plan("system" if system else "user", user=as_user,
                                      token_file=token_file, port=port, tailnet=addresses,
                                      at_boot=at_boot)
            mkdirs = []
        else:
            if user or system or as_user or tailnet_address or at_boot:
                usage_error("--user, --system, --as, --tailnet-address and --at-boot apply to "
                            "--systemd (the launchd agent starts at login already)")
            plan = units.launchd_plan(token_file=token_file, port=port, tailnet=tailnet)
            mkdirs = units.launchd_dirs()
        if print_only:
            for path, content in plan.files.items():
                if len(plan.files) > 1:
                    print(f"# {path}")
                print(content if isinstance(content, str) else content.decode(), end="")
            return
        units.install(plan, mkdirs=mkdirs)
    except (units.UnitsError, AuthError, OSError) as exc:
        fail(str(exc))
    for path in plan.files:
        print(f"wrote {path}")
    made = "created a new token in" if plan.token_created else "the token is"
    print(f"{made} {plan.token_file}; clients need the same token")
    print("next:\n" + "\n".join(f"    {step}" for step in plan.next_steps))


@argh.arg("uri", help=URI_HELP)
@client_options
@argh.arg("--remote-command", help=REMOTE_COMMAND_HELP)
@argh.arg("session", help="the PTY session to join (started with the shell, or --command, if absent)")
@argh.arg("--command", help="command for a new session (default: the login shell)")
def attach(uri: str, session: str, *, command: str = "", token_file: str | None = None,
           relay_id: str | None = None, unix_auth: bool = False,
           remote_command: str | None = None) -> None:
    """Attach this terminal to a PTY session interactively; Ctrl-] detaches and leaves the
    session running."""
    from .attach import attach_terminal

    if not os.isatty(0):
        usage_error("attach needs a terminal on stdin (it puts it in raw mode); run it from "
                    "an interactive shell, or use `connect --stdio` or `rpc` from scripts")
    sys.exit(_run_client(attach_terminal(uri, session, command,
                                         **_client_kwargs(token_file, relay_id, unix_auth,
                                                         remote_command))))


@argh.named("config")
@argh.arg("--from-tailscale", nargs="?", const=None, metavar="FILE", help="read `tailscale status --json` from FILE, or - for stdin (default: run the tailscale CLI)")
@argh.arg("--tag", action="append", metavar="TAG", help="keep the nodes carrying this ACL tag (tag:cmuxd-fleet); repeatable; default: every node")
@argh.arg("--port", help="the daemons' TCP port")
@argh.arg("--token-file", help="one relay token for the whole fleet, as clients find it (default: ~/.config/cmuxd/relay-token)")
@argh.arg("--token-dir", help="a relay token per host: DIR/<name> (instead of --token-file)")
@argh.arg("--relay-id", help="one relay id for every host (default: each host's short host name, the daemon's own default)")
@argh.arg("--srv", metavar="ZONE", help="print _cmux._tcp SRV records for ZONE instead of cmux.json")
def fleet_config(*, from_tailscale: str | None = None, tag: list[str] | None = None,
                 port: int = DEFAULT_PORT, token_file: str | None = None,
                 token_dir: str | None = None, relay_id: str | None = None,
                 srv: str | None = None) -> None:
    """Write cmux.json (to stdout) for the hosts of your tailnet that run the daemon."""
    from .fleet import (DEFAULT_TOKEN_FILE, FleetError, fleet_from_tailscale,
                        read_tailscale_status, srv_records)

    if token_file and token_dir:
        usage_error("choose one of --token-file (one token for the fleet) and "
                    "--token-dir (a token per host)")
    try:
        doc = read_tailscale_status(from_tailscale)
        fleet = fleet_from_tailscale(doc, tags=tag or (), port=port,
                                     token_file=token_file or DEFAULT_TOKEN_FILE,
                                     token_dir=token_dir, relay_id=relay_id)
        if not fleet.hosts and tag:
            raise FleetError(f"no node of the tailnet carries {' or '.join(tag)}; tag the "
                             "fleet's hosts (`tailscale up --advertise-tags=tag:cmuxd-fleet`) "
                             "or correct --tag")
        if not fleet.hosts:
            raise FleetError("the tailscale status lists no node; is tailscaled logged in "
                             "(`tailscale up`)?")
        sys.stdout.write(srv_records(fleet, srv) if srv is not None else fleet.dumps())
    except FleetError as exc:
        fail(str(exc))


@argh.named("status")
@argh.arg("hosts", nargs="*", metavar="HOST", help="only these hosts of cmux.json (default: all)")
@argh.arg("--fleet", metavar="FILE", help="the fleet file (default: $CMUX_FLEET, else ~/.config/cmuxd/cmux.json)")
@argh.arg("--timeout", help="seconds each host gets to connect, authenticate and answer")
@argh.arg("--json", help="print the reports as JSON")
def fleet_status(hosts: list[str], *, fleet: str | None = None,
                 timeout: float = 5.0, json: bool = False) -> None:
    """Check every host of cmux.json at once: state, round trip, version, uptime, workers,
    connections. Exits 3 when any host is not up."""
    from .fleet import FleetError, load_fleet
    from .fleet_status import check_fleet, format_table

    try:
        loaded = load_fleet(fleet)
    except FleetError as exc:
        print(f"cmuxd-remote: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    chosen = loaded.hosts
    if hosts:
        chosen = []
        for name in hosts:
            host = loaded.find(name)
            if host is None:
                print(f"cmuxd-remote: {name} is not a host of {loaded.path}; `cmuxd-remote "
                      "fleet status` with no name checks every host", file=sys.stderr)
                sys.exit(EXIT_USAGE)
            chosen.append(host)
    if not chosen:
        print(f"cmuxd-remote: {loaded.path} lists no host", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    reports = _with_progress(lambda progress: check_fleet(chosen, timeout, progress))
    if json:
        up = sum(r.up for r in reports)
        print(orjson.dumps({"hosts": [r.to_json() for r in reports], "up": up,
                            "not_up": len(reports) - up},
                           option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_table(reports))
    sys.exit(0 if all(r.up for r in reports) else EXIT_UNREACHABLE)


def _with_progress(start):
    """Run `start(progress)`, the coroutine of a check of many hosts, with a progress line on
    stderr while it waits when stderr is a terminal; its result."""
    from .fleet_status import progress_line

    if not sys.stderr.isatty():
        return asyncio.run(start(None))

    def progress(done: int, total: int, waiting: list[str]) -> None:
        width = max(20, (os.get_terminal_size(2).columns or 80) - 1)
        sys.stderr.write("\r\x1b[K" + progress_line(done, total, waiting, width))
        sys.stderr.flush()

    try:
        return asyncio.run(start(progress))
    finally:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


@argh.arg("hosts", nargs="*", metavar="HOST", help="addresses or hosts of cmux.json; with none, every host of cmux.json")
@argh.arg("--timeout", help="seconds each host gets to connect, authenticate and answer")
@argh.arg("--json", help="print the sessions of each host as JSON")
@argh.arg("--remote-command", help=REMOTE_COMMAND_HELP)
def sessions(hosts: list[str], *, timeout: float = 5.0, json: bool = False,
             remote_command: str | None = None) -> None:
    """List the PTY sessions of the hosts named, or of every host of cmux.json, all at once:
    what each runs, its size, attachments, idle time and scrollback. Exits 3 when a host
    did not answer."""
    from functools import partial

    from .client import fleet_address, parse_address
    from .fleet import FleetError, load_fleet
    from .fleet_sessions import Target, format_table, list_host
    from .fleet_status import check_fleet

    try:
        if hosts:
            targets = [Target(name, parse_address(name)) for name in hosts]
        else:
            loaded = load_fleet()
            targets = [Target(h.name, fleet_address(h)) for h in loaded.hosts]
            if not targets:
                usage_error(f"{loaded.path} lists no host; name the hosts to ask")
    except FleetError as exc:
        usage_error(f"{exc}; or name the hosts to ask: `cmuxd-remote sessions HOST…`")
    except ClientError as exc:
        fail(str(exc), exc.exit_code)
    check = partial(list_host, remote_command=remote_command)
    reports = _with_progress(lambda progress: check_fleet(targets, timeout, progress, check))
    if json:
        print(orjson.dumps({"hosts": [r.to_json() for r in reports],
                            "sessions": sum(len(r.sessions) for r in reports),
                            "not_reached": sum(not r.up for r in reports)},
                           option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_table(reports))
    sys.exit(0 if all(r.up for r in reports) else EXIT_UNREACHABLE)


@argh.arg("uri", help=URI_HELP)
@client_options
@argh.arg("session", help="the PTY session to end")
@argh.arg("--yes", help="end it without asking")
@argh.arg("--remote-command", help=REMOTE_COMMAND_HELP)
def kill(uri: str, session: str, *, yes: bool = False, token_file: str | None = None,
         relay_id: str | None = None, unix_auth: bool = False,
         remote_command: str | None = None) -> None:
    """End a PTY session: its processes are killed and every attachment ends. Asks first
    (on a terminal) unless --yes."""
    if not yes and not sys.stdin.isatty():
        usage_error(f"not ending session {session!r} without asking, and there is no terminal "
                    "to ask on; pass --yes to end it")

    async def go() -> int:
        client = await AsyncClient.connect(
            uri, **_client_kwargs(token_file, relay_id, unix_auth, remote_command))
        try:
            if not yes and not await _confirm_kill(client, uri, session):
                print(f"left session {session!r} on {uri} running", file=sys.stderr)
                return EXIT_RPC_ERROR
            await client.rpc("pty.close", {"session_id": session})
        except RemoteError as exc:
            if exc.code != "not_found":
                raise
            fail(f"there is no session {session!r} on {uri}; `cmuxd-remote sessions {uri}` "
                 "lists them")
        finally:
            await client.close()
        print(f"ended session {session!r} on {uri}", file=sys.stderr)
        return 0

    sys.exit(_run_client(go()))


async def _confirm_kill(client, uri: str, session: str) -> bool:
    """Say what is about to end and read y or n from the terminal."""
    from .fleet_sessions import LIST_PARAMS, printable

    listed = await client.rpc("pty.list", LIST_PARAMS)
    entry = next((s for s in listed.get("sessions", []) if s.get("session_id") == session), None)
    if entry is None:
        raise RemoteError("not_found", "PTY session not found")
    what = f"running {printable(entry['ext_command'])}, " if "ext_command" in entry else ""
    attached = len(entry.get("attachments") or ())
    sys.stderr.write(f"end session {printable(session)} on {printable(uri)} ({what}"
                     f"{attached} attached)? [y/N] ")
    sys.stderr.flush()
    answer = await asyncio.to_thread(sys.stdin.readline)
    return answer.strip().lower() in ("y", "yes")


def fail(message: str, code: int = 1) -> NoReturn:
    """End the command with one line on stderr and `code` (1: it could not be done)."""
    sys.stderr.write(f"cmuxd-remote: {message}\n")
    sys.exit(code)


def usage_error(message: str) -> NoReturn:
    """Options that cannot go together: exit 2, as for argparse's own usage errors."""
    fail(message, EXIT_USAGE)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Show a default only where the help text does not already say it, and only one that
    means something (not None, False or an empty string)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("(default" in text or not action.option_strings or default in (None, False, "")
                or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _keep_declared_option_names(parser: argparse.ArgumentParser) -> None:
    """argh adds names of its own: a one-letter alias whenever an initial is unique in its
    command (so -t meant --token-file in one command and --timeout in another), and the
    parameter's name beside a declared one (--as-user beside --as). Keep the declared names."""
    function = parser.get_default(argh.constants.DEST_FUNCTION)
    declared = {name for spec in getattr(function, argh.constants.ATTR_ARGS, [])
                for name in spec.cli_arg_names}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _keep_declared_option_names(sub)
            continue
        named = declared.intersection(action.option_strings)
        for option in list(action.option_strings):
            inferred = option not in declared and option != "-h"
            if inferred and (len(option) == 2 or named):
                action.option_strings.remove(option)
                del parser._option_string_actions[option]


def build_parser() -> argh.ArghParser:
    """The whole command line; a missing command is a usage error (exit 2), as in argparse."""
    parser = argh.ArghParser(prog="cmuxd-remote", description=DESCRIPTION,
                             formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=__version__)
    own = {"func_kwargs": {"formatter_class": HelpFormatter}}
    parser.add_commands([version, serve, status, ping, rpc, connect, attach, sessions, kill],
                        **own)
    for name, functions, text in [
        ("token", [token_new, token_rotate], "manage the relay token"),
        ("device", [device_key, device_add, device_trust, device_list, device_revoke],
         "device keys: one key pair per client device, added and revoked one by one"),
        ("units", [units_install], "install systemd or launchd service units"),
        ("hub", [hub_run, hub_stop, hub_upgrade],
         "the PTY hub: run it, end every session, upgrade it in place"),
        ("fleet", [fleet_config, fleet_status], "cmux.json from your tailnet; check every host"),
    ]:
        parser.add_commands(functions, group_name=name, **own, group_kwargs={
            "title": text, "description": f"cmuxd-remote {name} COMMAND --help for more",
            "dest": "command", "metavar": "COMMAND", "required": True})
    top = argh.assembling.get_subparsers(parser)
    top.dest, top.metavar, top.required = "command", "COMMAND", True
    _keep_declared_option_names(parser)
    return parser


def main() -> None:
    from .logs import setup_logging

    setup_logging()
    build_parser().dispatch()


if __name__ == "__main__":
    main()
