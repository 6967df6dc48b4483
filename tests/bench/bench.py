"""Benchmarks of cmuxd-remote: scripts that print figures, never timed assertions.

    scripts/bench                       # every section (about a minute)
    scripts/bench --only stdio          # sections: stdio, ssh, tcp, idle, pty, flood, frames, upgrade, front
    scripts/bench --only stdio --runs 15 --pings 50000
    scripts/bench --only ssh --connects 50
    scripts/bench --only tcp --auth-client python
    scripts/bench --only idle --idle-connections 20000
    scripts/bench --only pty --keystrokes 20000 --pty-mib 256
    scripts/bench --only front --front-runs 25

Sections

* stdio: `cmuxd-remote serve --stdio` as a child process; 20,000 pipelined pings written as
  fast as the pipe takes them while a reader thread counts the replies. Timed from the first
  byte written to the last reply read; several runs, each on a fresh daemon, and their median.
* ssh: the same daemon reached the way cmux reaches it today, `ssh host cmuxd-remote serve
  --stdio`, against an OpenSSH server the script starts on a loopback port with its own keys
  and config: connect + first reply (fresh connection, and over a ControlMaster), the
  round-trip time of sequential pings over one open pipe, and pipelined pings over it.
* tcp: the same figures over cmuxd's own TCP listener with the relay-token handshake, side by
  side with the ssh figures (see `tcp_section`), and authenticated connections per second.
  That load comes from tests/bench/authload.c, built with the C compiler on first use and
  cached in ~/.cache/cmuxd-bench/; without a compiler (or with --auth-client python) from an
  asyncio client, which uses about a core of its own and so measures less than the daemon
  can do.
* idle: 10,000 authenticated TCP connections held open and idle (the fd limit is raised for
  the script and the daemon it starts, which gets a matching --max-connections); the RSS of
  every daemon process (supervisor, workers, PTY hub) and the ping round trip of one more
  connection meanwhile.
* pty: keystroke echo over TCP (one byte in an id-less pty.write, timed until its pty.data),
  echoed by `cat` on a raw terminal, through cmuxd (one attachment; and one of two attachments
  served by different workers), through the Python reference relay (tests/bench/pyrelay.py:
  the same protocol in one asyncio process), through `ssh -tt` to the private OpenSSH server
  and through the C relay (tests/bench/ptyrelay.c: raw bytes, one C process). Every side keeps
  one session open for the whole run, and the sides take turns in blocks of keystrokes; the
  daemon CPU per keystroke is summed over the supervisor, workers and PTY hub. Then the
  output throughput of `cat` of a 64 MiB file to one attachment, through cmuxd, the Python
  reference and the C relay, and read by a bare `os.read` loop from the PTY itself.
* frames: the ping round trip of one connection to a one-worker daemon, alone and while
  another connection (a child process) streams 1 MiB writes of LFs, then of invalid frames,
  as fast as it can.

* front: `serve --stdio` with the daemon running (the front door hands its stdin and stdout
  to a worker) against `serve --stdio --standalone` (in-process) and the bare interpreter
  (`python -I -c pass`), exec → first pong, interleaved runs and their medians; the front
  process's RSS after its first pong; the first connection that starts a socket-activated
  daemon (systemd-socket-activate); 200,000 pipelined pings through each.
* flood: the auth latency of good clients (connect + handshake, one after another) without
  an attack, then while one source (loopback) holds 1,000 idle pre-auth connections and
  opens a new one for each the daemon drops (tests/idle_flood.py): from loopback, and, as
  root with `ip netns`, from a network namespace over a 200 ms round trip: a link that
  delays every packet 100 ms each way, the handshake's included (tests/delay_link.py, two
  TUN devices; this kernel has no tc netem). The namespace's address is the one exception
  to loopback only: a link of this host's own.

The idle, pty and flood sections always start their own daemon (they read its processes' memory
and CPU), also when --tcp-addr names one for the tcp section.

Every process a section starts (daemons, sshd, ssh clients and what they spawned) is ended
when the section ends, also on Ctrl-C or SIGTERM. Only loopback addresses are ever used.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import getpass
import hashlib
import hmac
import importlib.util
import ipaddress
import os
import resource
import secrets
import select
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import orjson
import psutil

from cmuxd.status import query_status

PING = b'{"id":1,"method":"ping"}\n'


# ---------------------------------------------------------------------------------------------
# processes: everything started here is ended here


class Processes:
    """The processes a section started; `close` ends them and everything they spawned."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], **kwargs) -> subprocess.Popen:
        # A session of its own: Ctrl-C reaches only this script, which then ends the children
        # in order (clients before the sshd that serves them) instead of all at once.
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(argv, **kwargs)
        self._procs.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen) -> None:
        """`proc` has exited and been waited for."""
        if proc in self._procs:
            self._procs.remove(proc)

    def stop(self, proc: subprocess.Popen, timeout: float = 3.0) -> None:
        """End `proc` and its descendants: SIGTERM, then SIGKILL after `timeout`."""
        try:
            tree = [psutil.Process(proc.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.Error:
            tree = []
        for p in tree:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(tree, timeout=timeout)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=timeout)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        self.forget(proc)

    def close(self) -> None:
        # Newest first: clients end before the servers they talk to. A second Ctrl-C waits
        # until the cleanup is done.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            while self._procs:
                self.stop(self._procs[-1])
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


@contextmanager
def piped_process(procs: Processes, argv: list[str]) -> Iterator[subprocess.Popen]:
    """`argv` with pipes for stdin and stdout (`proc.started`: the clock just before it was
    started). If the body fails, the process is stopped and the tail of its stderr printed,
    so the failure says why."""
    errlog = tempfile.TemporaryFile()
    started = time.perf_counter()
    proc = procs.start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errlog)
    proc.started = started
    try:
        yield proc
    except BaseException:
        procs.stop(proc)
        errlog.seek(0)
        sys.stderr.write(errlog.read().decode(errors="replace")[-2000:])
        raise
    finally:
        errlog.close()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------
# a byte pipe to a daemon, whatever carries it


READ_TIMEOUT = 15.0


def read_timeout(sock: socket.socket) -> None:
    """Make `sock` blocking (Pipe uses its raw fd) with a kernel receive timeout, so that a
    read of it waits in one system call and still cannot hang the bench."""
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("ll", int(READ_TIMEOUT), 0))


class Pipe:
    """Both directions of one RPC connection as raw fds (pipes or a socket)."""

    def __init__(self, write_fd: int, read_fd: int, leftover: bytes = b""):
        self.write_fd = write_fd
        self.read_fd = read_fd
        self.buf = bytearray(leftover)
        self._chunk = bytearray(1 << 16)

    def fill(self) -> int:
        """Append what one blocking read returns to `buf`; 0 at the end. One read and
        nothing before it, as the raw sides of the keystroke benches read: a select first
        costs a system call more per echo. The read goes into a buffer kept for the purpose:
        a fresh one as large would be a new mapping, a page fault and an unmapping each
        time, tens of µs that an echo would count against the daemon. A socket made by
        `read_timeout` raises TimeoutError when nothing comes."""
        try:
            n = os.readv(self.read_fd, [self._chunk])
        except BlockingIOError:
            raise TimeoutError(f"nothing from the daemon for {READ_TIMEOUT:.0f} s") from None
        self.buf += memoryview(self._chunk)[:n]
        return n

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view) :]

    def read(self, size: int = 1 << 20) -> bytes:
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            return data
        return os.read(self.read_fd, size)

    def readline(self) -> bytes:
        while True:
            cut = self.buf.find(b"\n")
            if cut >= 0:
                line = bytes(self.buf[: cut + 1])
                del self.buf[: cut + 1]
                return line
            data = os.read(self.read_fd, 1 << 16)
            if not data:
                raise EOFError("the daemon closed the connection")
            self.buf += data


def ping_batch(count: int) -> bytes:
    return b"".join(b'{"id":%d,"method":"ping"}\n' % i for i in range(1, count + 1))


def check_pong(line: bytes, want_id=None) -> None:
    msg = orjson.loads(line)
    if msg.get("ok") is not True or msg.get("result") != {"pong": True}:
        raise RuntimeError(f"unexpected reply to ping: {line[:200]!r}")
    if want_id is not None and msg.get("id") != want_id:
        raise RuntimeError(f"reply has id {msg.get('id')!r}, expected {want_id!r}")


def pipelined(pipe: Pipe, payload: bytes, count: int, timeout: float = 120.0) -> float:
    """Write `payload` (`count` pings) as fast as it goes while a thread reads the replies;
    seconds from the first byte written to the `count`-th reply."""
    done = threading.Event()
    state: dict = {"error": None, "end": 0.0}

    def reader() -> None:
        seen = 0
        tail = b""
        try:
            while seen < count:
                data = pipe.read()
                if not data:
                    raise EOFError(f"the daemon closed the connection after {seen} replies")
                seen += data.count(b"\n")
                tail = (tail + data)[-512:] if len(data) < 512 else data[-512:]
            state["end"] = time.perf_counter()
            if seen != count:
                raise RuntimeError(f"{seen} replies to {count} pings")
            check_pong(tail.rstrip(b"\n").rsplit(b"\n", 1)[-1], count)
        except BaseException as exc:  # reported by the caller
            state["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        pipe.write(payload)
    except OSError as exc:
        done.wait(5)
        raise state["error"] or exc
    deadline = time.monotonic() + timeout
    while not done.wait(0.2):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no complete answer to {count} pings within {timeout:.0f} s")
    if state["error"] is not None:
        raise state["error"]
    return state["end"] - start


def sequential_rtts(pipe: Pipe, count: int) -> list[float]:
    """Round-trip times of `count` pings, each sent once the previous reply arrived."""
    rtts = []
    clock = time.perf_counter
    for i in range(1, count + 1):
        frame = b'{"id":%d,"method":"ping"}\n' % i
        t0 = clock()
        pipe.write(frame)
        line = pipe.readline()
        rtts.append(clock() - t0)
        if i == 1 or i == count:
            check_pong(line, i)
    return rtts


# ---------------------------------------------------------------------------------------------
# figures


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs"


def rate(value: float) -> str:
    return f"{value:,.0f}/s"


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("{:<%d}" % w for w in widths)
    print("  " + line.format(*header))
    print("  " + "  ".join("-" * w for w in widths))
    for row in rows:
        print("  " + line.format(*row))


def daemon_argv(args) -> list[str]:
    """The command that runs the daemon under test (absolute, so ssh finds it too)."""
    if args.daemon:
        return shlex.split(args.daemon)
    script = Path(sys.executable).parent / "cmuxd-remote"
    if script.exists():
        return [str(script.absolute()), "serve", "--stdio"]
    return [sys.executable, "-m", "cmuxd", "serve", "--stdio"]


# ---------------------------------------------------------------------------------------------
# section: stdio


def stdio_section(args, procs: Processes, results: dict) -> None:
    argv = daemon_argv(args)
    count = args.pings
    payload = ping_batch(count)
    print(f"stdio: {count:,} pipelined pings to `{shlex.join(argv)}`, {args.runs} runs")
    rates, cpus = [], []
    for run in range(1, args.runs + 1):
        with piped_process(procs, argv) as proc:
            pipe = Pipe(proc.stdin.fileno(), proc.stdout.fileno())
            # Not timed: interpreter start-up and the first request.
            pipe.write(PING)
            check_pong(pipe.readline(), 1)
            daemon = psutil.Process(proc.pid)
            cpu0 = _cpu(daemon)
            seconds = pipelined(pipe, payload, count)
            cpu = _cpu(daemon) - cpu0
            proc.stdin.close()
            status = proc.wait(timeout=10)
            procs.forget(proc)
            if status != 0:
                raise RuntimeError(f"the daemon exited with status {status}")
        rates.append(count / seconds)
        cpus.append(cpu / count)
        print(f"  run {run}: {rate(count / seconds):>12}   ({ms(seconds)}; daemon CPU "
              f"{cpu / count * 1e6:.2f} µs/ping)")
    median = statistics.median(rates)
    results["stdio_pipelined"] = median
    print(f"  median: {rate(median):>11}   (min {rate(min(rates))}, max {rate(max(rates))})")
    cpu = statistics.median(cpus)
    print(f"  daemon CPU per ping, median: {cpu * 1e6:.2f} µs (one core's worth: "
          f"{rate(1 / cpu) if cpu else '-'})")


def _cpu(proc: psutil.Process) -> float:
    """CPU seconds used by `proc`: nanosecond run time from schedstat where Linux has it
    (cpu_times counts in 10 ms ticks, coarse for a 100 ms run)."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        t = proc.cpu_times()
        return t.user + t.system


# ---------------------------------------------------------------------------------------------
# section: ssh


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class SSHServer:
    """An OpenSSH server on a loopback port, with its own host key, client key and config."""

    def __init__(self, tmp: Path, procs: Processes, sshd: str = "/usr/sbin/sshd",
                 tty: bool = False):
        self.tmp = tmp
        self.procs = procs
        self.sshd = sshd
        self.tty = tty
        self.port = 0
        self.user = getpass.getuser()
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []
        self.masters: list[tuple[subprocess.Popen, str]] = []

    def start(self, attempts: int = 3) -> "SSHServer":
        if not os.path.exists(self.sshd):
            raise RuntimeError(
                f"{self.sshd} is missing: install it with `apt-get install -y openssh-server`"
            )
        for name in ("host_ed25519", "client_ed25519"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"cmuxd-bench-{name}",
                 "-f", str(self.tmp / name)],
                check=True, stdin=subprocess.DEVNULL,
            )
        shutil.copy(self.tmp / "client_ed25519.pub", self.tmp / "authorized_keys")
        if os.geteuid() == 0:
            # sshd insists on its privilege separation directory.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        for attempt in range(attempts):
            self.port = free_port()
            config = self._write_config()
            check = subprocess.run([self.sshd, "-t", "-f", str(config)], capture_output=True,
                                   text=True)
            if check.returncode != 0:
                raise RuntimeError(f"sshd refused its config: {check.stderr.strip()}")
            self.proc = self.procs.start(
                [self.sshd, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            if self._wait_listening():
                return self
            self.procs.stop(self.proc)
        raise RuntimeError("sshd did not start:\n" + "\n".join(self.log[-20:]))

    def _write_config(self) -> Path:
        t = self.tmp
        config = t / "sshd_config"
        config.write_text(
            f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {t / 'host_ed25519'}
AuthorizedKeysFile {t / 'authorized_keys'}
PidFile {t / 'sshd.pid'}
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers {self.user}
UseDNS no
PrintMotd no
PrintLastLog no
PermitTTY {'yes' if self.tty else 'no'}
X11Forwarding no
AllowAgentForwarding no
AllowTcpForwarding no
MaxStartups 200
MaxSessions 200
LogLevel INFO
"""
        )
        return config

    def _wait_listening(self, timeout: float = 10.0) -> bool:
        listening = threading.Event()
        stderr = self.proc.stderr

        def drain() -> None:
            try:
                for raw in stderr:
                    line = raw.decode(errors="replace").rstrip()
                    self.log.append(line)
                    del self.log[:-200]
                    if "Server listening" in line:
                        listening.set()
            except (ValueError, OSError):
                pass  # stop() closed the pipe under this read

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if listening.wait(0.05):
                return True
            if self.proc.poll() is not None:
                return False
        return False

    def ssh_argv(self, *remote: str, control_path: str | None = None, master: bool = False,
                 persist: str | None = None, tty: bool = False) -> list[str]:
        """An ssh command line for this server. With `control_path`, a client that goes through
        that ControlMaster (or, with `master`, the master itself); with `tty`, `-tt` (a remote
        PTY even though stdin is a pipe) and no escape character."""
        argv = [
            "ssh", "-F", "/dev/null", "-i", str(self.tmp / "client_ed25519"),
            "-p", str(self.port), "-l", self.user,
            "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
        ]
        if tty:
            argv += ["-tt", "-e", "none"]
        if control_path is not None:
            argv += ["-o", f"ControlMaster={'yes' if master else 'no'}",
                     "-o", f"ControlPath={control_path}"]
            if persist is not None:
                argv += ["-o", f"ControlPersist={persist}"]
        argv.append("127.0.0.1")
        argv += remote
        return argv

    def start_master(self) -> str:
        """An established ControlMaster; returns its ControlPath."""
        path = str(self.tmp / f"cm-{len(self.masters)}")
        proc = self.procs.start(
            self.ssh_argv("-N", control_path=path, master=True, persist="no"),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.masters.append((proc, path))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("ssh ControlMaster failed: " + proc.stderr.read().decode())
            check = subprocess.run(
                ["ssh", "-F", "/dev/null", "-o", f"ControlPath={path}", "-O", "check",
                 "127.0.0.1"], capture_output=True,
            )
            if check.returncode == 0:
                return path
            time.sleep(0.05)
        raise RuntimeError("ssh ControlMaster did not come up")

    def stop(self) -> None:
        for proc, path in reversed(self.masters):
            subprocess.run(["ssh", "-F", "/dev/null", "-o", f"ControlPath={path}", "-O", "exit",
                            "127.0.0.1"], capture_output=True, timeout=5)
            self.procs.stop(proc)
        self.masters.clear()
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None


@contextmanager
def ssh_server(procs: Processes, tty: bool = False) -> Iterator[SSHServer]:
    """An OpenSSH server for the duration of the block, then gone with all its sessions."""
    with tempfile.TemporaryDirectory(prefix="cmuxd-bench-ssh-") as tmp:
        server = SSHServer(Path(tmp), procs, tty=tty)
        try:
            yield server.start()
        finally:
            server.stop()


def spawn_first_reply(argv: list[str], procs: Processes) -> float:
    """Start `argv` (something that ends in `serve --stdio`), send one ping; seconds from the
    start to the reply line. The process is then closed (not timed)."""
    with piped_process(procs, argv) as proc:
        t0 = proc.started
        pipe = Pipe(proc.stdin.fileno(), proc.stdout.fileno())
        pipe.write(PING)
        line = pipe.readline()
        elapsed = time.perf_counter() - t0
        check_pong(line, 1)
        proc.stdin.close()
        proc.wait(timeout=10)
        procs.forget(proc)
        return elapsed


def steady_state(argv: list[str], procs: Processes, args) -> tuple[list[float], list[float]]:
    """Over one open `argv` pipe: sequential ping RTTs, then pipelined runs (seconds each)."""
    with piped_process(procs, argv) as proc:
        pipe = Pipe(proc.stdin.fileno(), proc.stdout.fileno())
        pipe.write(PING)
        check_pong(pipe.readline(), 1)
        sequential_rtts(pipe, min(100, args.rtt))  # warm-up
        rtts = sequential_rtts(pipe, args.rtt)
        payload = ping_batch(args.pings)
        runs = [pipelined(pipe, payload, args.pings) for _ in range(args.pipe_runs)]
        procs.stop(proc)
        return rtts, runs


def ssh_section(args, procs: Processes, results: dict) -> None:
    daemon = daemon_argv(args)
    n = args.connects
    print(f"ssh: `ssh -p PORT 127.0.0.1 {shlex.join(daemon)}` against a private OpenSSH server")
    with ssh_server(procs) as server:
        print(f"  sshd on 127.0.0.1:{server.port} ({_sshd_version()})")
        rows = []

        local = [spawn_first_reply(daemon, procs) for _ in range(n)]
        results["local_first_reply"] = pct(local, 50)
        rows.append(("spawn + first reply, no ssh (reference)", ms(pct(local, 50)),
                     ms(pct(local, 90)), str(n)))

        argv = server.ssh_argv(*daemon)
        fresh = [spawn_first_reply(argv, procs) for _ in range(n)]
        results["ssh_first_reply"] = pct(fresh, 50)
        rows.append(("(a) connect + first reply, fresh ssh", ms(pct(fresh, 50)),
                     ms(pct(fresh, 90)), str(n)))

        path = server.start_master()
        argv_cm = server.ssh_argv(*daemon, control_path=path)
        muxed = [spawn_first_reply(argv_cm, procs) for _ in range(n)]
        results["ssh_cm_first_reply"] = pct(muxed, 50)
        rows.append(("(b) connect + first reply, ControlMaster", ms(pct(muxed, 50)),
                     ms(pct(muxed, 90)), str(n)))
        table(rows, ("", "p50", "p90", "n"))

        rtts, runs = steady_state(argv, procs, args)
        results["ssh_rtt_p50"] = pct(rtts, 50)
        results["ssh_rtt_p99"] = pct(rtts, 99)
        rates = [args.pings / s for s in runs]
        results["ssh_pipelined"] = statistics.median(rates)
        print()
        table(
            [
                (f"(c) ping RTT over one ssh pipe ({args.rtt} sequential)", us(pct(rtts, 50)),
                 us(pct(rtts, 99)), us(min(rtts))),
                (f"(d) {args.pings:,} pipelined pings over the ssh pipe", "", "", ""),
            ],
            ("", "p50", "p99", "min"),
        )
        for i, r in enumerate(rates, 1):
            print(f"      run {i}: {rate(r)}")
        print(f"      median: {rate(results['ssh_pipelined'])}")


def _sshd_version() -> str:
    out = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
    return (out.stderr or out.stdout).strip()


# ---------------------------------------------------------------------------------------------
# section: tcp (cmuxd's own listener, relay-token handshake)


def client_mac(key: bytes, relay_id: str, server_nonce: str) -> str:
    msg = f"relay_id={relay_id}\nnonce={server_nonce}\nversion=1".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def relay_mac(key: bytes, relay_id: str, client_nonce: str, server_nonce: str) -> str:
    msg = (f"cmux-relay-server-proof\nrelay_id={relay_id}\nclient_nonce={client_nonce}"
           f"\nserver_nonce={server_nonce}\nversion=1").encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


class Handshake:
    """The client side of the relay handshake (spec §7.5) as a small state machine, so the
    blocking and the asyncio measurements share it. Mutual: the server must prove the token."""

    def __init__(self, relay_id: str, token_hex: str):
        self.relay_id = relay_id
        self.key = bytes.fromhex(token_hex)
        self.client_nonce = secrets.token_hex(32)
        self.server_nonce = ""

    def answer(self, challenge_line: bytes) -> bytes:
        ch = orjson.loads(challenge_line)
        if (ch.get("protocol") != "cmux-relay-auth" or ch.get("version") != 1
                or ch.get("relay_id") != self.relay_id or not ch.get("nonce")):
            raise RuntimeError("relay auth challenge mismatch")
        self.server_nonce = str(ch["nonce"])
        return orjson.dumps({
            "client_nonce": self.client_nonce,
            "mac": client_mac(self.key, self.relay_id, self.server_nonce),
            "relay_id": self.relay_id,
        }) + b"\n"

    def check(self, reply_line: bytes) -> None:
        reply = orjson.loads(reply_line)
        want = relay_mac(self.key, self.relay_id, self.client_nonce, self.server_nonce)
        got = reply.get("relay_mac")
        if reply.get("ok") is not True or type(got) is not str or not hmac.compare_digest(
            got, want
        ):
            raise RuntimeError(f"relay handshake refused: {reply_line[:200]!r}")


class TCPTarget:
    """Where a cmuxd TCP listener is and how to authenticate to it."""

    def __init__(self, host: str, port: int, relay_id: str, token_hex: str):
        if not ipaddress.ip_address(host).is_loopback:
            raise SystemExit(f"refusing to benchmark {host}: loopback addresses only")
        self.host, self.port = host, port
        self.relay_id, self.token_hex = relay_id, token_hex
        self.pid: int | None = None  # the supervisor's, when the daemon was started here

    def connect(self, first: bytes = b"") -> tuple[socket.socket, Pipe]:
        """An authenticated connection; `first` (a request) is pipelined with the MAC."""
        sock = socket.create_connection((self.host, self.port), timeout=2)
        read_timeout(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe = Pipe(sock.fileno(), sock.fileno())
        hs = Handshake(self.relay_id, self.token_hex)
        pipe.write(hs.answer(pipe.readline()) + first)
        hs.check(pipe.readline())
        return sock, pipe


def start_tcp_daemon(tmp: Path, procs: Processes, args, extra: tuple[str, ...] = (),
                     site: Path | None = None) -> TCPTarget:
    """Start `cmuxd-remote serve --tcp` on a free loopback port with a fresh token.

    The flags are the ones the direct-listener issue names (--tcp, --token-file, --relay-id,
    --workers); the token goes through a 0600 file, never argv. The state directory (control
    and PTY hub sockets) is under `tmp`, so a daemon the user runs is never touched.
    """
    token = secrets.token_hex(32)
    relay_id = "cmuxd-bench"
    token_file = tmp / "relay-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    port = free_port()
    # `site`: a copy of the package to run instead (as an installed one that can change).
    head = [str(Path(daemon_argv(args)[0]))] if site is None else \
        [sys.executable, "-P", "-m", "cmuxd"]
    argv = [*head, "serve", "--tcp", f"127.0.0.1:{port}", "--token-file", str(token_file),
            "--relay-id", relay_id, "--state-dir", str(tmp / "state")]
    if args.workers:
        argv += ["--workers", str(args.workers)]
    argv += extra
    errlog = open(tmp / "daemon.log", "wb")
    where = {} if site is None else {"env": dict(os.environ, PYTHONPATH=str(site)), "cwd": "/"}
    proc = procs.start(argv, stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog, **where)
    target = TCPTarget("127.0.0.1", port, relay_id, token)
    target.pid = proc.pid
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the TCP daemon exited:\n"
                               + (tmp / "daemon.log").read_text(errors="replace")[-2000:])
        try:
            sock, pipe = target.connect(PING)
        except (OSError, EOFError):
            time.sleep(0.05)
            continue
        check_pong(pipe.readline(), 1)
        sock.close()
        return target
    raise RuntimeError("the TCP daemon did not answer within 15 s")


@contextmanager
def section_dir(procs: Processes, name: str) -> Iterator[Path]:
    """A temporary directory for a section's daemon (token, log, state); the section's
    processes are ended before it is removed, so none of them writes into it afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"cmuxd-bench-{name}-") as tmp:
        try:
            yield Path(tmp)
        finally:
            procs.close()


def tcp_listener_available(args) -> bool:
    """cmuxd.client exists and `serve` takes --tcp: the listener has landed."""
    if importlib.util.find_spec("cmuxd.client") is None:
        return False
    script = daemon_argv(args)[0]
    out = subprocess.run([script, "serve", "--help"], capture_output=True, text=True)
    return "--tcp" in out.stdout


def tcp_first_reply(target: TCPTarget) -> float:
    """connect + handshake + first reply (the ping pipelined with the MAC), in seconds."""
    t0 = time.perf_counter()
    sock, pipe = target.connect(PING)
    line = pipe.readline()
    elapsed = time.perf_counter() - t0
    sock.close()
    check_pong(line, 1)
    return elapsed


class _AuthClient(asyncio.Protocol):
    """One handshake, as lean as asyncio allows so the client is not what gets measured.
    With `keep_open` the authenticated connection stays open (and idle)."""

    def __init__(self, target: TCPTarget, done: asyncio.Future, keep_open: bool = False):
        self.hs = Handshake(target.relay_id, target.token_hex)
        self.done = done
        self.buf = b""
        self.answered = False
        self.keep_open = keep_open
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf and not self.done.done():
            line, self.buf = self.buf.split(b"\n", 1)
            try:
                if not self.answered:
                    self.answered = True
                    self.transport.write(self.hs.answer(line))
                else:
                    self.hs.check(line)
                    if not self.keep_open:
                        self.transport.close()
                    self.done.set_result(None)
            except Exception as exc:
                self.transport.close()
                self.done.set_exception(exc)

    def connection_lost(self, exc) -> None:
        self.lost = True
        if not self.done.done():
            self.done.set_exception(exc or EOFError("closed during the handshake"))


async def _auth_loop(target: TCPTarget, deadline: float, counter: list[int]) -> None:
    loop = asyncio.get_running_loop()
    while time.perf_counter() < deadline:
        done = loop.create_future()
        await loop.create_connection(lambda: _AuthClient(target, done), target.host, target.port)
        await done
        counter[0] += 1


class AuthLoad:
    """What one authenticated-connections-per-second run measured, all client processes
    together: `cpu` holds each one's CPU seconds."""

    def __init__(self, client: str, connections: int, errors: int, seconds: float,
                 cpu: list[float]):
        self.client, self.connections, self.errors = client, connections, errors
        self.seconds, self.cpu = seconds, cpu

    @property
    def rate(self) -> float:
        return self.connections / self.seconds

    @property
    def cpu_per_connection(self) -> float:
        return sum(self.cpu) / max(1, self.connections)

    @property
    def cores(self) -> list[float]:
        """Each client process's CPU in cores: near 1.0 means the client was the limit."""
        return [c / self.seconds for c in self.cpu]


def auth_rate(target: TCPTarget, seconds: float, concurrency: int
              ) -> tuple[int, float, float]:
    """Authenticated connections made by `concurrency` asyncio clients in a loop for
    `seconds`, the CPU seconds this process used meanwhile, and the wall time (the
    handshakes in flight at the deadline finish and count)."""

    async def run() -> int:
        counter = [0]
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(_auth_loop(target, deadline, counter)
                               for _ in range(concurrency)))
        return counter[0]

    t0, c0 = time.perf_counter(), time.process_time()
    count = asyncio.run(run())
    return count, time.process_time() - c0, time.perf_counter() - t0


def _auth_rate_job(job) -> tuple[int, float, float]:
    return auth_rate(*job)


def auth_rate_parallel(target: TCPTarget, seconds: float, concurrency: int,
                       processes: int) -> AuthLoad:
    """The Python load generator: `processes` processes share `concurrency` clients."""
    import multiprocessing

    if processes <= 1:
        out = [auth_rate(target, seconds, concurrency)]
    else:
        per = max(1, concurrency // processes)
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            out = pool.map(_auth_rate_job, [(target, seconds, per)] * processes)
    return AuthLoad("Python asyncio", sum(n for n, _, _ in out), 0,
                    max(wall for _, _, wall in out), [cpu for _, cpu, _ in out])


AUTHLOAD_SOURCE = Path(__file__).with_name("authload.c")
PTYRELAY_SOURCE = Path(__file__).with_name("ptyrelay.c")


def _compiler() -> list[str] | None:
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def build_c_tool(source_path: Path, tmp: Path, libs: tuple[str, ...] = ()
                 ) -> tuple[Path | None, str]:
    """A C program of this directory compiled; else None and why. Binaries are cached under
    ~/.cache/cmuxd-bench/ by the hash of the source and the compiler, so only the first run
    compiles."""
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc, clang or $CC) found"
    source = source_path.read_bytes()
    digest = hashlib.sha256(source + "\0".join(cc).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cmuxd-bench"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = tmp
    binary = cache / f"{source_path.stem}-{digest}"
    if not binary.exists():
        # Built under a private name, then renamed: concurrent runs never see half a file.
        partial = cache / f".{source_path.stem}-{digest}-{os.getpid()}"
        try:
            out = subprocess.run([*cc, "-O2", "-Wall", "-Wextra", "-o", str(partial),
                                  str(source_path), *libs], capture_output=True, text=True)
        except OSError as exc:
            return None, f"{shlex.join(cc)} failed: {exc}"
        if out.returncode != 0:
            partial.unlink(missing_ok=True)
            return None, f"{shlex.join(cc)} failed: {out.stderr.strip()[-500:]}"
        os.replace(partial, binary)
    return binary, ""


def build_authload(tmp: Path) -> tuple[Path | None, str]:
    """The C load generator (authload.c) compiled, and its --selftest passed; else None and
    why."""
    binary, why = build_c_tool(AUTHLOAD_SOURCE, tmp)
    if binary is None:
        return None, why
    out = subprocess.run([str(binary), "--selftest"], capture_output=True, text=True)
    if out.returncode != 0:
        return None, f"{binary} --selftest failed: {(out.stdout + out.stderr).strip()[-500:]}"
    return binary, ""


def authload_parallel(binary: Path, target: TCPTarget, seconds: float, concurrency: int,
                      processes: int, procs: Processes) -> AuthLoad:
    """The C load generator: `processes` authload processes share `concurrency` connections
    in flight. The credentials go on their stdin, never argv."""
    per = max(1, concurrency // max(1, processes))
    argv = [str(binary), target.host, str(target.port), str(seconds), str(per)]
    creds = f"{target.relay_id}\n{target.token_hex}\n".encode()
    running = []
    for _ in range(max(1, processes)):
        # The credentials wait in the pipe, so every process starts its load at once.
        read_end, write_end = os.pipe()
        os.write(write_end, creds)
        os.close(write_end)
        try:
            running.append(procs.start(argv, stdin=read_end, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE))
        finally:
            os.close(read_end)
    reports, complaints = [], []
    for proc in running:
        out, err = proc.communicate(timeout=seconds + 60)
        procs.forget(proc)
        if proc.returncode != 0 or not out.strip():
            raise RuntimeError(f"authload exited with {proc.returncode}: "
                               f"{err.decode(errors='replace').strip()[-500:]}")
        reports.append(orjson.loads(out.strip().splitlines()[-1]))
        if err.strip():
            complaints.append(err.decode(errors="replace").strip())
    load = AuthLoad("C authload", sum(r["connections"] for r in reports),
                    sum(r["errors"] for r in reports), max(r["seconds"] for r in reports),
                    [r["cpu"] for r in reports])
    if load.errors:
        print(f"  authload: {load.errors:,} failed handshakes; {complaints[0]}")
    if not load.connections:
        raise RuntimeError("authload made no authenticated connection")
    return load


def tcp_section(args, procs: Processes, results: dict) -> None:
    """The ssh figures again over cmuxd's TCP listener, and the ratios between them.

    Against `--tcp-addr` (with --token-file/--relay-id) when given, else a daemon started
    here with `start_tcp_daemon` once `cmuxd.client` exists and `serve` takes --tcp.
    Figures: connect + handshake + first reply (the ping pipelined with the MAC, as the
    client may do), sequential ping RTT and pipelined pings over one connection, and
    authenticated connections per second. The client side is the spec's mutual handshake
    written out here (`Handshake`), on raw sockets, so that what is measured is the daemon
    rather than a client library. The connections/s load comes from authload.c
    (`build_authload`, `authload_parallel`) when a C compiler exists: the asyncio client
    (`auth_rate_parallel`) spends about a core at ~4,000/s, on the cores the daemon needs.
    """
    print("tcp: cmuxd's TCP listener with the relay-token handshake")
    with section_dir(procs, "tcp") as tmp:
        if args.tcp_addr:
            host, _, port = args.tcp_addr.rpartition(":")
            token = Path(args.token_file).read_text().strip() if args.token_file else \
                os.environ.get("CMUX_RELAY_TOKEN", "")
            relay_id = args.relay_id or os.environ.get("CMUX_RELAY_ID", "")
            target = TCPTarget(host.strip("[]"), int(port), relay_id, token)
        elif not tcp_listener_available(args):
            print("  skipped: TCP listener not available")
            return
        else:
            target = start_tcp_daemon(Path(tmp), procs, args)
        n = args.tcp_connects
        first = [tcp_first_reply(target) for _ in range(n)]
        results["tcp_first_reply"] = pct(first, 50)

        sock, pipe = target.connect()
        try:
            sequential_rtts(pipe, min(100, args.rtt))
            rtts = sequential_rtts(pipe, args.rtt)
            payload = ping_batch(args.pings)
            rates = [args.pings / pipelined(pipe, payload, args.pings)
                     for _ in range(args.pipe_runs)]
        finally:
            sock.close()
        results["tcp_rtt_p50"], results["tcp_rtt_p99"] = pct(rtts, 50), pct(rtts, 99)
        results["tcp_pipelined"] = statistics.median(rates)
        binary, why = (None, "--auth-client python") if args.auth_client == "python" \
            else build_authload(Path(tmp))
        if binary is None and args.auth_client == "c":
            raise RuntimeError(f"--auth-client c: {why}")
        daemon = daemon_processes(target.pid) if target.pid else []
        cpu0 = {p.pid: _cpu(p) for _, p in daemon}
        if binary is not None:
            load = authload_parallel(binary, target, args.auth_seconds, args.auth_concurrency,
                                     args.auth_procs, procs)
        else:
            load = auth_rate_parallel(target, args.auth_seconds, args.auth_concurrency,
                                      args.auth_procs)
        made = load.connections
        results["tcp_auth_rate"] = load.rate
        results["tcp_auth_client"] = load.client
        results["tcp_auth_client_cpu"] = load.cpu_per_connection
        auth_daemon: dict[str, float] = {}
        for name, p in daemon:
            try:
                auth_daemon[name] = auth_daemon.get(name, 0.0) + (_cpu(p) - cpu0[p.pid]) / made
            except psutil.Error:
                pass

    r = results
    rows = [
        ("connect + auth + first reply (p50)", ms(r["tcp_first_reply"]),
         _fmt(r, "ssh_first_reply", ms), _ratio(r, "ssh_first_reply", "tcp_first_reply"),
         _fmt(r, "ssh_cm_first_reply", ms),
         _ratio(r, "ssh_cm_first_reply", "tcp_first_reply")),
        ("ping RTT p50", us(r["tcp_rtt_p50"]), _fmt(r, "ssh_rtt_p50", us),
         _ratio(r, "ssh_rtt_p50", "tcp_rtt_p50"), "", ""),
        ("ping RTT p99", us(r["tcp_rtt_p99"]), _fmt(r, "ssh_rtt_p99", us),
         _ratio(r, "ssh_rtt_p99", "tcp_rtt_p99"), "", ""),
        (f"{args.pings:,} pipelined pings", rate(r["tcp_pipelined"]),
         _fmt(r, "ssh_pipelined", rate), _ratio(r, "tcp_pipelined", "ssh_pipelined"),
         _fmt(r, "stdio_pipelined", rate) + " (stdio)",
         _ratio(r, "tcp_pipelined", "stdio_pipelined")),
        (f"authenticated connections/s ({args.auth_concurrency} in flight)",
         rate(r["tcp_auth_rate"]), "", "", "", ""),
    ]
    table(rows, ("", "tcp", "ssh fresh", "×", "ssh ControlMaster", "×"))
    print("  (× = how many times better TCP is; > 1 means TCP wins)")
    source = f"tests/bench/{AUTHLOAD_SOURCE.name}" if binary is not None else \
        f"the C one is not used: {why}"
    print(f"  connections/s: load generator {load.client} ({source}), {len(load.cpu)} process"
          f"{'es' if len(load.cpu) > 1 else ''}: client CPU {us(load.cpu_per_connection)} per"
          f" connection, {', '.join(f'{c:.0%}' for c in load.cores)} of a core (near 100%"
          " means the client, not the daemon, was the limit)")
    spent = {k: v for k, v in auth_daemon.items() if v >= 1e-6}
    if spent:
        total = sum(spent.values())
        results["tcp_auth_daemon_cpu"] = total
        cores = os.cpu_count() or 1
        ceiling = min(cores / total, 1 / spent.get("supervisor", total))
        results["tcp_auth_ceiling"] = ceiling
        print("  daemon CPU per authenticated connection: "
              + ", ".join(f"{k} {us(v)}" for k, v in spent.items())
              + f" ({us(total)} in all): with the client elsewhere, at most about "
              f"{rate(ceiling)} (all {cores} cores, the supervisor being one process)")


def _fmt(results: dict, key: str, fmt: Callable[[float], str]) -> str:
    return fmt(results[key]) if key in results else "-"


def _ratio(results: dict, num: str, den: str) -> str:
    if num in results and den in results and results[den]:
        return f"{results[num] / results[den]:.1f}×"
    return "-"


# ---------------------------------------------------------------------------------------------
# section: idle (many authenticated idle connections held at once)


def raise_fd_limit(want: int) -> int:
    """Raise this process's RLIMIT_NOFILE (inherited by the daemon it starts) to `want` if
    the hard limit allows, or to the hard limit; as root the hard limit is raised too.
    Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        unlimited = hard == resource.RLIM_INFINITY
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (want, hard if unlimited or hard >= want else want))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def daemon_processes(pid: int) -> list[tuple[str, psutil.Process]]:
    """The supervisor and every process under it (workers, PTY hub, shells), named."""
    sup = psutil.Process(pid)
    out = [("supervisor", sup)]
    for child in sup.children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        name = ("worker" if "cmuxd.worker" in cmd else "PTY hub" if "cmuxd.hub_process" in cmd
                else child.name())
        out.append((name, child))
    return out


def daemon_memory(pid: int) -> list[tuple[str, int, int]]:
    """(name, RSS, PSS) in bytes of each of the daemon's processes. RSS counts the pages the
    processes share (the interpreter, libraries) once per process; PSS divides them."""
    rows = []
    for name, proc in daemon_processes(pid):
        try:
            with proc.oneshot():
                info = proc.memory_full_info()
        except psutil.Error:
            continue
        rows.append((name, info.rss, getattr(info, "pss", info.rss)))
    return rows


async def _hold(target: TCPTarget, count: int, concurrency: int) -> list[_AuthClient]:
    """`count` authenticated connections, opened by `concurrency` clients in a loop (the
    daemon caps handshakes in flight), left open and idle."""
    loop = asyncio.get_running_loop()
    clients: list[_AuthClient] = []
    left = [count]

    async def opener() -> None:
        while left[0] > 0:
            left[0] -= 1
            done = loop.create_future()
            _, client = await loop.create_connection(
                lambda: _AuthClient(target, done, keep_open=True), target.host, target.port)
            clients.append(client)
            await asyncio.wait_for(done, 15)

    tasks = [asyncio.ensure_future(opener()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        for client in clients:
            client.transport.close()
        raise
    return clients


def idle_section(args, procs: Processes, results: dict) -> None:
    """Hold `--idle-connections` authenticated idle TCP connections, then report the memory
    of every daemon process and the ping round trip of one more connection meanwhile."""
    count = args.idle_connections
    fds = raise_fd_limit(count + 4096)
    if fds < count + 1024:
        count = max(0, fds - 1024)
        print(f"  the fd limit is {fds} and cannot be raised: holding {count:,} connections")
    print(f"idle: {count:,} authenticated idle TCP connections, then {args.idle_pings:,} "
          "sequential pings on one more")
    with section_dir(procs, "idle") as tmp:
        target = start_tcp_daemon(Path(tmp), procs, args,
                                  ("--max-connections", str(count + 1000)))
        time.sleep(0.5)  # let the workers and the hub settle after start-up
        before = daemon_memory(target.pid)
        base_rtts = _ping_rtts(target, args.idle_pings)

        async def run():
            t0 = time.perf_counter()
            clients = await _hold(target, count, args.idle_concurrency)
            opened = time.perf_counter() - t0
            try:
                await asyncio.sleep(1.0)  # the supervisor's reports and heartbeats settle
                memory = daemon_memory(target.pid)
                rtts = await asyncio.to_thread(_ping_rtts, target, args.idle_pings)
                await asyncio.sleep(0)
                lost = sum(c.lost for c in clients)
            finally:
                for client in clients:
                    client.transport.close()
                await asyncio.sleep(0.1)
            return opened, memory, rtts, lost

        loop = asyncio.new_event_loop()
        try:
            opened, memory, rtts, lost = loop.run_until_complete(run())
        finally:
            loop.close()

    rss, pss = sum(r for _, r, _ in memory), sum(p for _, _, p in memory)
    rss0 = sum(r for _, r, _ in before)
    results["idle_count"] = count
    results["idle_rss"], results["idle_pss"] = rss, pss
    results["idle_rss_before"] = rss0
    results["idle_rtt_p50"], results["idle_rtt_p99"] = pct(rtts, 50), pct(rtts, 99)
    print(f"  opened in {opened:.1f} s ({rate(count / opened)}); closed by the daemon while held: "
          f"{lost}")
    table(
        [(name, mib(r0), mib(r), mib(p)) for (name, r0, _), (_, r, p) in
         zip(before, memory)]
        + [("total", mib(rss0), mib(rss), mib(pss))],
        ("process", "RSS idle daemon", f"RSS, {count:,} held", "PSS, held"),
    )
    if count:
        print(f"  per held connection: {(rss - rss0) / count / 1024:.1f} KiB of RSS")
    table(
        [("ping RTT, no other connection", us(pct(base_rtts, 50)), us(pct(base_rtts, 99))),
         (f"ping RTT, {count:,} held", us(pct(rtts, 50)), us(pct(rtts, 99)))],
        ("", "p50", "p99"),
    )
    print(f"  goal: total RSS under 150 MB: {_met(rss < 150e6)} ({rss / 1e6:.0f} MB); "
          f"ping p99 under 2 ms: {_met(pct(rtts, 99) < 2e-3)} ({ms(pct(rtts, 99))})")


TESTS_DIR = Path(__file__).resolve().parent.parent


def _good_clients(procs: Processes, prefix: list[str], host: str, port: int, count: int,
                  ) -> list[float]:
    with piped_process(procs, prefix + [sys.executable, str(TESTS_DIR / "auth_latency.py"),
                                        host, str(port), str(count)]) as proc:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError("a good client failed (its error is above)")
    return orjson.loads(out)


def flood_section(args, procs: Processes, results: dict) -> None:
    """Good clients' auth latency without and under an idle pre-auth flood from one source."""
    sys.path.insert(0, str(TESTS_DIR))
    from netns import DelayedNamespace, netns_permitted

    count, held = args.flood_clients, args.flood_connections
    raise_fd_limit(held + 4096)
    tag = str(os.getpid() % 100000)
    why = netns_permitted(f"cmuxd-far-{tag}-probe")
    ns = DelayedNamespace(tag, 100, subnet=219) if why is None else None
    print(f"flood: {count} good clients one after another, without and while loopback holds "
          f"{held:,} idle pre-auth connections")
    try:
        with section_dir(procs, "flood") as tmp:
            if ns:
                with socket.create_server((ns.root_address, 0)) as probe:
                    far_port = probe.getsockname()[1]
            extra = ("--tcp", f"{ns.root_address}:{far_port}") if ns else ()
            target = start_tcp_daemon(Path(tmp), procs, args, extra)
            # The good clients (children) read the credentials from the environment.
            saved = dict(os.environ)
            os.environ.update(CMUX_RELAY_ID=target.relay_id, CMUX_RELAY_TOKEN=target.token_hex,
                              PYTHONPATH=str(TESTS_DIR.parent))
            paths = [("loopback", [], "127.0.0.1", target.port)]
            if ns:
                paths.append(("200 ms round trip", ns.prefix, ns.root_address, far_port))
            else:
                print(f"  no 200 ms path: {why}")
            _flood_rows(procs, results, paths, count, held, target)
    finally:
        if "saved" in locals():
            os.environ.clear()
            os.environ.update(saved)
        if ns:
            ns.close()


def _flood_rows(procs, results, paths, count, held, target) -> None:
    rows = []
    calm = {name: _good_clients(procs, prefix, host, port, count)
            for name, prefix, host, port in paths}
    with piped_process(procs, [sys.executable, str(TESTS_DIR / "idle_flood.py"), "127.0.0.1",
                               str(target.port), str(held)]) as flood:
        flood.stdout.readline()
        time.sleep(2.0)  # the table is full and churning
        t0 = time.perf_counter()
        attacked = {name: _good_clients(procs, prefix, host, port, count)
                    for name, prefix, host, port in paths}
        seconds = time.perf_counter() - t0
        flood.terminate()
        opened = int(flood.communicate(timeout=30)[0].split()[-1])
    for name, _, _, _ in paths:
        key = "flood_" + ("local" if name == "loopback" else "far")
        results[key + "_p50"], results[key + "_p99"] = (pct(attacked[name], 50),
                                                        pct(attacked[name], 99))
        rows.append((name, ms(pct(calm[name], 50)), ms(pct(calm[name], 99)),
                     ms(pct(attacked[name], 50)), ms(pct(attacked[name], 99))))
    table(rows, ("good client's auth", "p50", "p99", f"p50, {held:,} held", f"p99, {held:,} held"))
    print(f"  the flood opened {opened:,} connections in all (about "
          f"{rate(opened / (seconds + 2.0))} while the good clients ran)")
    worst = max(results[k] for k in results if k.startswith("flood_") and k.endswith("_p99"))
    print(f"  goal: p99 under 1 s under the flood: {_met(worst < 1.0)} ({ms(worst)})")


def _ping_rtts(target: TCPTarget, count: int) -> list[float]:
    sock, pipe = target.connect()
    try:
        sequential_rtts(pipe, min(100, count))  # warm-up
        return sequential_rtts(pipe, count)
    finally:
        sock.close()


def mib(value: float) -> str:
    return f"{value / 1048576:.1f} MiB"


def mbps(value: float) -> str:
    return f"{value / 1e6:.0f} MB/s"


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


# ---------------------------------------------------------------------------------------------
# section: upgrade (a live upgrade while a user types)

UPGRADE_TYPING = 6.0
"""Seconds of typing, one key every 10 ms; the upgrade starts after the first second."""


def upgrade_section(args, procs: Processes, results: dict) -> None:
    """A new version installed in place and SIGHUP, while a client types into a session and
    waits for each echo: how long until every process that serves new connections runs the
    new code, and the longest echo meanwhile. The PTY hub's upgrade ends attachments (their
    links drop), so the client attaches again from its offset, as `attach` does."""
    import cmuxd

    print(f"upgrade: keystrokes every 10 ms for {UPGRADE_TYPING:.0f} s; SIGHUP after 1 s, with "
          "a new version installed in place")
    with section_dir(procs, "upgrade") as tmp:
        site = tmp / "site"
        shutil.copytree(Path(cmuxd.__file__).parent, site / "cmuxd",
                        ignore=shutil.ignore_patterns("__pycache__"))
        target = start_tcp_daemon(tmp, procs, args, site=site)
        control = tmp / "state" / "control.sock"
        sock, pipe = target.connect()
        ident = _pty_ident("upgrade")
        seen = _pty_attach(pipe, ident, ECHO_COMMAND, ext_resume_from=0)
        end = len(seen)
        while b"READY" not in seen:
            _, data, end = _upgrade_output(pipe, end)
            seen += data
        echoes, reattaches, lost = [], 0, 0
        upgraded_after = None
        t0 = time.monotonic()
        signalled = None
        i = 0
        while time.monotonic() - t0 < UPGRADE_TYPING:
            if signalled is None and time.monotonic() - t0 > 1.0:
                init = site / "cmuxd" / "__init__.py"
                init.write_text(init.read_text().replace(
                    f'__version__ = "{cmuxd.__version__}"', '__version__ = "9.9.9"'))
                os.kill(target.pid, signal.SIGHUP)
                signalled = time.monotonic()
            key = KEYS[i % len(KEYS): i % len(KEYS) + 1]
            i += 1
            sent = time.perf_counter()
            pipe.write(orjson.dumps({"method": "pty.write", "params": dict(
                ident, data_base64=base64.b64encode(key).decode())}) + b"\n")
            got = b""
            while key not in got:
                try:
                    kind, data, end = _upgrade_output(pipe, end)
                except TimeoutError:  # lost in the hub's exec: a client that numbers its
                    lost += 1         # writes (attach) says so; this one sends it again
                    kind = "error"
                if kind == "exit":  # the attachment ended: attach again from where it stopped
                    reattaches += 1
                    pipe.write(orjson.dumps({"id": 2, "method": "pty.attach", "params": dict(
                        ident, cols=80, rows=24, require_existing=True,
                        ext_resume_from=end)}) + b"\n")
                elif kind == "error":  # the key was refused (no hub for a moment): again
                    pipe.write(orjson.dumps({"method": "pty.write", "params": dict(
                        ident, data_base64=base64.b64encode(key).decode())}) + b"\n")
                else:
                    got += data
            echoes.append(time.perf_counter() - sent)
            if signalled is not None and upgraded_after is None and i % 10 == 0 \
                    and _runs_everywhere(control, "9.9.9"):
                upgraded_after = time.monotonic() - signalled
            time.sleep(0.01)
        while upgraded_after is None and time.monotonic() - signalled < 30:
            if _runs_everywhere(control, "9.9.9"):
                upgraded_after = time.monotonic() - signalled
            time.sleep(0.05)
        sock.close()
    r = results
    r["upgrade_seconds"] = upgraded_after if upgraded_after is not None else float("inf")
    r["upgrade_worst_echo"] = max(echoes)
    print(f"  every new process runs the new code after {r['upgrade_seconds']:.2f} s "
          f"(goal < 2 s: {_met(r['upgrade_seconds'] < 2)})")
    r["upgrade_lost_keys"] = lost
    print(f"  {len(echoes)} keystrokes, {reattaches} attach(es) again, {lost} lost in the "
          f"hub's exec and sent again: echo p50 "
          f"{us(pct(echoes, 50))}, p99 {ms(pct(echoes, 99))}, longest {ms(max(echoes))} "
          f"(goal < 500 ms: {_met(max(echoes) < 0.5)})")


def _upgrade_output(pipe: Pipe, end: int) -> tuple[str, bytes, int]:
    """The next event that matters: ("data", output past `end`, the new end), ("exit", …)
    once the attachment has ended, or ("error", …) when a write was refused."""
    while True:
        if b"\n" not in pipe.buf and not select.select([pipe.read_fd], [], [], 1.0)[0]:
            raise TimeoutError
        msg = _frame(pipe)
        event = msg.get("event")
        if event == "pty.data":
            data = base64.b64decode(msg["data_base64"])
            offset = msg.get("ext_offset", 0)
            return "data", data[max(0, end - offset):], max(end, offset + len(data))
        if event in ("pty.exit", "pty.error"):
            return event[4:], b"", end
        if msg.get("ok") is False:
            raise RuntimeError(f"attaching again failed: {msg}")


def _runs_everywhere(control: Path, version: str) -> bool:
    """The supervisor (re-executed in place), the hub and every serving worker run
    `version`."""
    try:
        status = query_status(control)
    except OSError:
        return False
    serving = [w for w in status["workers"] if w["state"] == "serving"]
    return status["version"] == version and status["hub"]["version"] == version and serving \
        and all(w["version"] == version for w in serving)


# ---------------------------------------------------------------------------------------------
# section: frames (one client streaming junk, another pinging on the same worker)

FLOODS = {"LFs": b"\n" * (1 << 20), "invalid frames": b"{x}\n" * (1 << 18)}


@contextmanager
def flooding(sock: socket.socket, chunk: bytes) -> Iterator[None]:
    """A child process writes `chunk` on the authenticated `sock` as fast as it goes and
    reads whatever comes back, until the block ends. A process of its own, so that it shares
    no interpreter lock with the pings measured meanwhile."""
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            threading.Thread(target=_discard_replies, args=(sock,), daemon=True).start()
            while True:
                sock.sendall(chunk)
        finally:
            os._exit(0)
    try:
        time.sleep(0.2)  # the flood is under way
        yield
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _discard_replies(sock: socket.socket) -> None:
    while sock.recv(1 << 20):
        pass


def frames_section(args, procs: Processes, results: dict) -> None:
    """Ping round trips on a one-worker daemon, alone and while another connection streams
    1 MiB writes of LFs or of invalid frames as fast as it can."""
    print(f"frames: {args.frames_pings:,} sequential pings on a one-worker daemon, alone and "
          "while another connection streams junk")
    with section_dir(procs, "frames") as tmp:
        target = start_tcp_daemon(Path(tmp), procs, args, ("--workers", "1"))  # the last wins
        rows = [("no flood", *_ping_percentiles(target, args.frames_pings, results, "none"))]
        for name, chunk in FLOODS.items():
            flood_sock, _ = target.connect()
            with flooding(flood_sock, chunk):
                rows.append((f"while a client streams {name}",
                             *_ping_percentiles(target, args.frames_pings, results, name)))
            flood_sock.close()
    table([(label, ms(p50), ms(p99)) for label, p50, p99 in rows], ("", "p50", "p99"))
    rise = max(results[f"frames_p99_{name}"] for name in FLOODS) - results["frames_p99_none"]
    results["frames_p99_rise"] = rise
    print(f"  goal: a flood raises another client's ping p99 by under 10 ms: {_met(rise < 0.01)} "
          f"({ms(rise)})")


def _ping_percentiles(target: TCPTarget, count: int, results: dict, name: str
                      ) -> tuple[float, float]:
    rtts = _ping_rtts(target, count)
    results[f"frames_p50_{name}"], results[f"frames_p99_{name}"] = pct(rtts, 50), pct(rtts, 99)
    return pct(rtts, 50), pct(rtts, 99)


# ---------------------------------------------------------------------------------------------
# section: pty (keystroke echo and output throughput of a PTY session)

ECHO_COMMAND = "stty raw -echo && printf READY && exec cat"
"""The program that echoes: `cat` on a terminal in raw mode without the line discipline's
echo, so each byte goes through a process reading it and writing it back (as a shell's line
editor does) and comes back alone and unchanged. The same command runs under `ssh -tt`."""
KEYS = b"abcdefghijklmnopqrstuvwxyz0123456789"


def _pty_ident(name: str) -> dict:
    """A new session of its own: its process starts with this attachment, no replay."""
    return {"session_id": f"bench-{name}-{secrets.token_hex(4)}", "attachment_id": f"{name}-1",
            "client_attachment_token": secrets.token_hex(8)}


def _frame(pipe: Pipe) -> dict:
    """The next frame from the daemon over a socket set up by `read_timeout`; an error
    rather than a hang if none comes."""
    while b"\n" not in pipe.buf:
        if not pipe.fill():
            raise EOFError("the daemon closed the connection")
    return orjson.loads(pipe.readline())


def _pty_attach(pipe: Pipe, ident: dict, command: str, **params) -> bytes:
    """pty.attach (id 1) with `params` besides, waiting for its reply; the output that came
    before it."""
    pipe.write(orjson.dumps({"id": 1, "method": "pty.attach", "params": dict(
        ident, cols=80, rows=24, command=command, **params)}) + b"\n")
    early = b""
    while True:
        msg = _frame(pipe)
        if msg.get("id") == 1:
            if msg.get("ok") is not True:
                raise RuntimeError(f"pty.attach failed: {msg}")
            return early
        if msg.get("event") == "pty.data":
            early += base64.b64decode(msg["data_base64"])
        elif msg.get("event") in ("pty.exit", "pty.error"):
            raise RuntimeError(f"pty.attach: {msg}")


def _pty_output(pipe: Pipe, decode: bool = True):
    """The payload of the next pty.data event; without `decode`, only its size."""
    while True:
        msg = _frame(pipe)
        event = msg.get("event")
        if event == "pty.data":
            text = msg["data_base64"]
            if decode:
                return base64.b64decode(text)
            return len(text) // 4 * 3 - text.endswith("=") - text.endswith("==")
        if event in ("pty.exit", "pty.error"):
            raise RuntimeError(f"the PTY session ended: {msg}")


def protocol_echo(pipe: Pipe, ident: dict) -> tuple[Callable[[int], None], Callable[[], bytes]]:
    """Attach a new session running the echo program over `pipe` (cmuxd or the Python
    reference) and wait until it is ready; how to send a key (an id-less pty.write) and read
    its echo (the next pty.data)."""
    seen = _pty_attach(pipe, ident, ECHO_COMMAND)
    deadline = time.monotonic() + 10
    while b"READY" not in seen:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the echo program did not start: {seen[-200:]!r}")
        seen += _pty_output(pipe)
    frames = [orjson.dumps({"method": "pty.write", "params": dict(
        ident, data_base64=base64.b64encode(bytes([k])).decode())}) + b"\n" for k in KEYS]
    return (lambda k: pipe.write(frames[k])), (lambda: _pty_output(pipe))


def raw_echo(w: int, r: int) -> tuple[Callable[[int], None], Callable[[], bytes]]:
    """The same for raw bytes (ssh -tt, the C relay): write one byte to `w`, read it back from
    `r`, once the echo program has said READY."""
    _read_until(r, b"READY", 15)

    def receive() -> bytes:
        data = os.read(r, 4096)
        if not data:
            raise EOFError("the echo program's output was closed")
        return data

    return (lambda k: os.write(w, KEYS[k : k + 1])), receive


def _time_echoes(send_key: Callable[[int], None], receive: Callable[[], bytes], count: int,
                 warmup: int, between: Callable[[], None] | None = None) -> list[float]:
    """Seconds from sending KEYS[k] to receiving it back alone, `count` times after
    `warmup` untimed ones; `between` runs after each, untimed."""
    clock = time.perf_counter
    out = []
    for i in range(warmup + count):
        k = i % len(KEYS)
        key = KEYS[k : k + 1]
        t0 = clock()
        send_key(k)
        got = receive()
        while key not in got:
            got += receive()
        elapsed = clock() - t0
        if got != key:
            raise RuntimeError(f"echo of {key!r} came back as {got!r}")
        if i >= warmup:
            out.append(elapsed)
        if between is not None:
            between()
    return out


def _read_until(fd: int, want: bytes, timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while want not in out:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RuntimeError(f"waited {timeout:.0f} s for {want!r}; got {out[-200:]!r}")
        data = os.read(fd, 65536)
        if not data:
            raise EOFError(f"closed while waiting for {want!r}; got {out[-200:]!r}")
        out += data
    return out


class EchoSide:
    """One echo program kept open for the whole run (one session per side), and what its
    keystrokes measured: echo times, and with `cpu` (the CPU seconds of each role of the
    daemon serving it, so far) the daemon CPU they cost, untimed keys included."""

    def __init__(self, label: str, keys: tuple[Callable[[int], None], Callable[[], bytes]],
                 between: Callable[[], None] | None = None):
        self.label = label
        self.send_key, self.receive = keys
        self.between = between
        self.cpu: Callable[[], dict[str, float]] | None = None
        self.samples: list[float] = []
        self.keys = 0
        self.cpu_seconds: dict[str, float] = {}

    def run(self, count: int, warmup: int = 0) -> None:
        cpu0 = self.cpu() if self.cpu else {}
        self.samples += _time_echoes(self.send_key, self.receive, count, warmup, self.between)
        self.keys += warmup + count
        for role, seconds in (self.cpu() if self.cpu else {}).items():
            self.cpu_seconds[role] = self.cpu_seconds.get(role, 0.0) + seconds - cpu0[role]

    def cpu_per_key(self, role: str | None = None) -> float:
        """Daemon CPU seconds per keystroke, of `role` or of all its processes."""
        if role is not None:
            return self.cpu_seconds[role] / self.keys
        return sum(self.cpu_seconds.values()) / self.keys


def echo_rounds(sides: list[EchoSide], count: int, block: int, warmup: int) -> None:
    """`count` keystrokes to each side in blocks of `block`, the order rotating from round to
    round, so that what the machine does meanwhile (other users, clock changes) falls on every
    side alike. Each block starts with a few untimed keys, to wake what slept meanwhile."""
    for side in sides:
        side.run(0, warmup)
    for start in range(0, count, block):
        turn = start // block % len(sides)
        for side in sides[turn:] + sides[:turn]:
            side.run(min(block, count - start), warmup=5)


@contextmanager
def relay_connection(argv: list[str], procs: Processes, started: list | None = None
                     ) -> Iterator[socket.socket]:
    """A client connection to a reference relay (`argv` prints its loopback port and serves
    one client), so that what this machine allows is known next to what cmuxd does:
    ptyrelay.c is the least any daemon can do (one C process copying raw bytes, no protocol),
    pyrelay.py the least a Python daemon of this protocol can do (one asyncio process). The
    relay's process goes in `started`, if given."""
    proc = procs.start(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    if started is not None:
        started.append(proc)
    try:
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            read_timeout(sock)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            yield sock
    finally:
        procs.stop(proc)


PYRELAY = [sys.executable, str(Path(__file__).with_name("pyrelay.py"))]
CAT_AFTER_GO = "stty raw -echo && printf READY && read go && exec cat {}"
"""`cat` of a file on a raw terminal once a line arrives, for the readers of raw bytes."""


def raw_cat_seconds(w: int, r: int, size: int) -> float:
    """Seconds from the first output byte of CAT_AFTER_GO to the last of its `size` bytes,
    timed as `protocol_cat_seconds` is."""
    got = len(_read_until(r, b"READY", 15).split(b"READY", 1)[1])
    os.write(w, b"\n")
    data = os.read(r, 1 << 20)
    t0 = time.perf_counter()
    got += len(data)
    while got < size and data:
        data = os.read(r, 1 << 20)
        got += len(data)
    elapsed = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"{got:,} bytes arrived for a {size:,}-byte file")
    return elapsed


def relay_throughput(binary: Path, procs: Processes, path: Path, size: int) -> float:
    """Seconds for `cat` of `path` through the C relay."""
    command = CAT_AFTER_GO.format(shlex.quote(str(path)))
    with relay_connection([str(binary), command], procs) as sock:
        return raw_cat_seconds(sock.fileno(), sock.fileno(), size)


def bare_throughput(procs: Processes, path: Path, size: int) -> float:
    """Seconds for `cat` of `path` read from the PTY master by this process in an `os.read`
    loop: no socket, no protocol, the most Python reads from a PTY here."""
    master, slave = os.openpty()
    try:
        proc = procs.start(["/bin/sh", "-c", CAT_AFTER_GO.format(shlex.quote(str(path)))],
                           stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        slave = -1
        seconds = raw_cat_seconds(master, master, size)
        procs.stop(proc)
        return seconds
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def protocol_cat_seconds(pipe: Pipe, path: Path, size: int) -> float:
    """`cat` of `path` in a raw-mode PTY to one attachment: seconds from the first pty.data to
    the last byte of the file. The payload is counted from the length of its base64, not
    decoded: CPython decodes base64 at about 200 MB/s, and the client shares the daemon's
    cores."""
    # Output only once the terminal is raw, so that the bytes arrive unchanged.
    got = len(_pty_attach(pipe, _pty_ident("cat"),
                          f"stty raw -echo && exec cat {shlex.quote(str(path))}"))
    if not got:
        got = _pty_output(pipe, decode=False)
    t0 = time.perf_counter()
    while got < size:
        got += _pty_output(pipe, decode=False)
    elapsed = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"{got:,} bytes arrived for a {size:,}-byte file")
    return elapsed


def cmuxd_throughput(target: TCPTarget, path: Path, size: int) -> tuple[float, dict]:
    """`protocol_cat_seconds` through cmuxd, and the CPU seconds each daemon process used."""
    sock, pipe = target.connect()
    with sock:
        cpu0 = {p.pid: _cpu(p) for _, p in daemon_processes(target.pid)}
        seconds = protocol_cat_seconds(pipe, path, size)
        cpu: dict[str, float] = {}
        for n, p in daemon_processes(target.pid):
            if p.pid in cpu0:
                cpu[n] = cpu.get(n, 0.0) + _cpu(p) - cpu0[p.pid]
    return seconds, cpu


def pyrelay_throughput(procs: Processes, path: Path, size: int) -> tuple[float, float]:
    """`protocol_cat_seconds` through the Python reference relay, and the CPU seconds the
    relay used (what cmuxd's worker spends is set beside it)."""
    started: list = []
    with relay_connection(PYRELAY, procs, started) as sock:
        relay = psutil.Process(started[0].pid)
        cpu0 = _cpu(relay)
        seconds = protocol_cat_seconds(Pipe(sock.fileno(), sock.fileno()), path, size)
        return seconds, _cpu(relay) - cpu0


DAEMON_ROLES = ("supervisor", "worker", "PTY hub")


def worker_of(status: Path, sock: socket.socket, timeout: float = 10.0) -> int:
    """The pid of the worker serving the connection `sock` (the client end), found as the
    worker among those the control socket lists that holds its peer end."""
    port = sock.getsockname()[1]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in query_status(status)["workers"]:
            try:
                conns = psutil.Process(w["pid"]).net_connections("tcp")
            except psutil.Error:
                continue
            if any(c.raddr and c.raddr.port == port for c in conns):
                return w["pid"]
        time.sleep(0.02)
    raise RuntimeError(f"no worker holds the connection from port {port} after {timeout:.0f} s")


def second_attachment_side(target: TCPTarget, status: Path, stack: ExitStack
                           ) -> tuple[EchoSide, int, int] | None:
    """An echo session with two attachments on connections that different workers serve,
    timed on the first while the second drains its copy of the output between keystrokes;
    and the two workers. None if the daemon put every connection on one worker."""
    sock_a, pipe_a = target.connect()
    stack.callback(sock_a.close)
    worker_a = worker_of(status, sock_a)
    for _ in range(8):
        sock_b, pipe_b = target.connect()
        stack.callback(sock_b.close)
        worker_b = worker_of(status, sock_b)
        if worker_b != worker_a:
            break
    else:
        return None
    ident = _pty_ident("shared")
    keys = protocol_echo(pipe_a, ident)
    _pty_attach(pipe_b, dict(ident, attachment_id="shared-2",
                             client_attachment_token=secrets.token_hex(8)),
                ECHO_COMMAND, require_existing=True)

    def drain() -> None:
        while True:
            try:
                data = sock_b.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if not data or b'"pty.exit"' in data:
                raise RuntimeError("the second attachment was dropped")

    return EchoSide("cmuxd, 2 attachments", keys, between=drain), worker_a, worker_b


def pty_section(args, procs: Processes, results: dict) -> None:
    """Keystroke echo through cmuxd (one attachment, and two on different workers), the Python
    reference relay, `ssh -tt` and the C relay, interleaved in one run; the output throughput
    of one attachment next to the references'."""
    n, warm, block = args.keystrokes, min(50, max(1, args.keystrokes // 10)), args.echo_block
    print(f"pty: keystroke echo (`{ECHO_COMMAND}`), {n:,} keystrokes per side in rounds of "
          f"{block}; `cat` of {args.pty_mib} MiB to one attachment, {args.pty_runs} runs")
    with section_dir(procs, "pty") as tmp, ExitStack() as stack:
        # Two workers at least: the second attachment must be on another worker.
        daemon_args = argparse.Namespace(**dict(vars(args), workers=max(2, args.workers)))
        target = start_tcp_daemon(tmp, procs, daemon_args)
        relay, no_relay = build_c_tool(PTYRELAY_SOURCE, tmp, libs=("-lutil",))
        server = stack.enter_context(ssh_server(procs, tty=True))

        sock, pipe = target.connect()
        stack.callback(sock.close)
        cmuxd_side = EchoSide("cmuxd tcp", protocol_echo(pipe, _pty_ident("echo")))
        sock = stack.enter_context(relay_connection(PYRELAY, procs))
        pyref_side = EchoSide("Python reference", protocol_echo(
            Pipe(sock.fileno(), sock.fileno()), _pty_ident("echo")))
        ssh = stack.enter_context(piped_process(procs, server.ssh_argv(ECHO_COMMAND, tty=True)))
        stack.callback(procs.stop, ssh)
        ssh_side = EchoSide("ssh -tt", raw_echo(ssh.stdin.fileno(), ssh.stdout.fileno()))
        sides = [cmuxd_side, pyref_side, ssh_side]
        if relay is not None:
            sock = stack.enter_context(relay_connection([str(relay), ECHO_COMMAND], procs))
            sides.append(EchoSide("C relay", raw_echo(sock.fileno(), sock.fileno())))

        shared = second_attachment_side(target, tmp / "state" / "control.sock", stack)
        if shared is not None:
            sides.insert(1, shared[0])
        # Taken once the sessions exist, so that the PTY hub is among them.
        daemon = [(name, p) for name, p in daemon_processes(target.pid) if name in DAEMON_ROLES]

        def daemon_cpu() -> dict[str, float]:
            out = dict.fromkeys(DAEMON_ROLES, 0.0)
            for name, p in daemon:
                out[name] += _cpu(p)
            return out

        for side in sides[:1 + (shared is not None)]:
            side.cpu = daemon_cpu
        echo_rounds(sides, n, block, warm)
        stack.close()

        path = tmp / "payload"
        size = args.pty_mib << 20
        with open(path, "wb") as f:
            for _ in range(args.pty_mib):
                f.write(os.urandom(1 << 20))
        runs, rates = [], {"cmuxd tcp": [], "Python reference": [], "bare os.read loop": [],
                           "C relay": []}
        pyref_runs = []
        for _ in range(args.pty_runs):
            runs.append(cmuxd_throughput(target, path, size))
            rates["cmuxd tcp"].append(size / runs[-1][0])
            pyref_runs.append(pyrelay_throughput(procs, path, size))
            rates["Python reference"].append(size / pyref_runs[-1][0])
            rates["bare os.read loop"].append(size / bare_throughput(procs, path, size))
            if relay is not None:
                rates["C relay"].append(size / relay_throughput(relay, procs, path, size))

    r = results
    keys = {"cmuxd tcp": "pty", "cmuxd, 2 attachments": "pty2", "Python reference": "pyref",
            "ssh -tt": "ssh", "C relay": "floor"}
    for side in sides:
        r[f"{keys[side.label]}_echo_p50"] = pct(side.samples, 50)
        r[f"{keys[side.label]}_echo_p99"] = pct(side.samples, 99)
        if side.cpu:
            r[f"{keys[side.label]}_echo_cpu"] = side.cpu_per_key()
    rows = [("keystroke echo " + label, *(us(f(s.samples)) for s in sides))
            for label, f in (("p50", lambda v: pct(v, 50)), ("p99", lambda v: pct(v, 99)),
                             ("min", min))]
    rows.append(("daemon CPU per keystroke", *(us(s.cpu_per_key()) if s.cpu else ""
                                               for s in sides)))
    for role in DAEMON_ROLES:
        rows.append(("  of which " + role, *(us(s.cpu_per_key(role)) if s.cpu else ""
                                            for s in sides)))
    table(rows, ("", *(s.label for s in sides)))
    if shared is not None:
        print(f"  (2 attachments: one session attached from a connection on worker {shared[1]} "
              f"and one on worker {shared[2]}, timed on the first)")
    else:
        print("  (no figure with 2 attachments: the daemon put every connection on one worker)")
    if relay is None:
        print(f"  (no C relay: {no_relay})")
    if cmuxd_side.cpu_per_key("PTY hub") >= 10e-6:
        print("  (the PTY hub worked for every keystroke of the session with one attachment: "
              "it read that PTY itself rather than lend the reading to the worker)")
    print(f"  cmuxd p50 / Python reference p50: {r['pty_echo_p50'] / r['pyref_echo_p50']:.2f} "
          f"(goal ≤ 1.1: {_met(r['pty_echo_p50'] <= 1.1 * r['pyref_echo_p50'])}); "
          f"cmuxd p50 / ssh p50: {r['pty_echo_p50'] / r['ssh_echo_p50']:.2f} "
          f"(goal ≤ 1.0: {_met(r['pty_echo_p50'] <= r['ssh_echo_p50'])}); "
          f"cmuxd p99 / ssh p99: {r['pty_echo_p99'] / r['ssh_echo_p99']:.2f} "
          f"(goal ≤ 1.5: {_met(r['pty_echo_p99'] <= 1.5 * r['ssh_echo_p99'])})")
    if "pty2_echo_p50" in r:
        print(f"  2 attachments p50 / 1 attachment p50: "
              f"{r['pty2_echo_p50'] / r['pty_echo_p50']:.2f}")

    keys = {"cmuxd tcp": "pty_throughput", "Python reference": "pyref_throughput",
            "bare os.read loop": "bare_throughput", "C relay": "floor_throughput"}
    print(f"  output, `cat` of {size / 1e6:.0f} MB, MB/s of payload:")
    table([(label, ", ".join(f"{x / 1e6:.0f}" for x in got),
            f"{statistics.median(got) / 1e6:.0f}") for label, got in rates.items() if got],
          ("", "runs", "median"))
    for label, got in rates.items():
        if got:
            r[keys[label]] = statistics.median(got)
    seconds, cpu_used = sorted(runs)[len(runs) // 2]
    print("  cmuxd's CPU in its median run: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in cpu_used.items() if v >= 0.01)
          + f"; the Python reference's in its median run: "
          f"{sorted(pyref_runs)[len(pyref_runs) // 2][1]:.2f} s")
    ratio = r["pty_throughput"] / r["pyref_throughput"]
    print(f"  cmuxd / Python reference: {ratio:.2f} (goal ≥ 0.9: {_met(ratio >= 0.9)})")
    print(f"  goal: echo p50 under 1 ms: {_met(r['pty_echo_p50'] < 1e-3)}; at least 5× lower "
          f"than ssh: {_met(r['ssh_echo_p50'] >= 5 * r['pty_echo_p50'])}; throughput at least "
          f"50 MB/s: {_met(r['pty_throughput'] >= 50e6)}")


# ---------------------------------------------------------------------------------------------
# section: front (serve --stdio handing its pipes to the running daemon)


def exec_seconds(argv: list[str], procs: Processes) -> float:
    """Start `argv` and wait for it to exit: its whole start-up."""
    started = time.perf_counter()
    proc = procs.start(argv, stdin=subprocess.DEVNULL)
    proc.wait(timeout=30)
    procs.forget(proc)
    return time.perf_counter() - started


def first_pong_and_rss(argv: list[str], procs: Processes) -> tuple[float, int]:
    """Exec → first pong of a `serve --stdio`, and the RSS of its process after that pong
    (the front door's, while it waits for the daemon to finish with its pipes)."""
    with piped_process(procs, argv) as proc:
        pipe = Pipe(proc.stdin.fileno(), proc.stdout.fileno())
        pipe.write(PING)
        line = pipe.readline()
        elapsed = time.perf_counter() - proc.started
        check_pong(line, 1)
        rss = psutil.Process(proc.pid).memory_info().rss
        proc.stdin.close()
        status = proc.wait(timeout=10)
        procs.forget(proc)
        if status != 0:
            raise RuntimeError(f"`{shlex.join(argv)}` exited with status {status}")
        return elapsed, rss


def pipelined_rate(argv: list[str], procs: Processes, count: int) -> float:
    with piped_process(procs, argv) as proc:
        pipe = Pipe(proc.stdin.fileno(), proc.stdout.fileno())
        pipe.write(PING)
        check_pong(pipe.readline(), 1)
        seconds = pipelined(pipe, ping_batch(count), count)
        proc.stdin.close()
        proc.wait(timeout=10)
        procs.forget(proc)
        return count / seconds


def activated_first_pong(script: str, tmp: Path, procs: Processes) -> float | None:
    """Exec → first pong when the front's connection starts the daemon: systemd-socket-activate
    holds its Unix socket, as a --user unit's cmuxd.socket would. None without the tool."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        return None
    state = tmp / f"activated-{secrets.token_hex(4)}"
    state.mkdir(mode=0o700)
    log = open(tmp / "activated.log", "ab")
    holder = procs.start([activate, "-l", str(state / "cmuxd.sock"), script, "serve",
                          "--workers", "1", "--token-file", str(tmp / "relay-token"),
                          "--state-dir", str(state)], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while not (state / "cmuxd.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    elapsed, _ = first_pong_and_rss([script, "serve", "--stdio", "--state-dir", str(state)],
                                    procs)
    procs.stop(holder)
    subprocess.run([script, "hub", "stop", "--state-dir", str(state)], capture_output=True,
                   timeout=30)
    return elapsed


def front_section(args, procs: Processes, results: dict) -> None:
    script = daemon_argv(args)[0]
    bare = [sys.executable, "-I", "-c", "pass"]
    with section_dir(procs, "front") as tmp:
        start_tcp_daemon(tmp, procs, args)
        front = [script, "serve", "--stdio", "--state-dir", str(tmp / "state")]
        alone = [script, "serve", "--stdio", "--standalone"]
        print(f"front: exec → first pong, `{shlex.join(front[1:])}` (front door) and "
              f"`{shlex.join(alone[1:])}` (in-process) beside `python -I -c pass`, "
              f"{args.front_runs} interleaved runs")
        figures: dict[str, list[float]] = {"bare": [], "front": [], "alone": []}
        rss: list[int] = []
        for run in range(1, args.front_runs + 1):
            figures["bare"].append(exec_seconds(bare, procs))
            seconds, front_rss = first_pong_and_rss(front, procs)
            figures["front"].append(seconds)
            rss.append(front_rss)
            figures["alone"].append(first_pong_and_rss(alone, procs)[0])
        med = {k: statistics.median(v) for k, v in figures.items()}
        results.update(front_bare=med["bare"], front_first_pong=med["front"],
                       front_inprocess_first_pong=med["alone"],
                       front_rss=statistics.median(rss))
        table([("python -I -c pass", ms(med["bare"]), "1.0×", ""),
               ("front door", ms(med["front"]), f"{med['front'] / med['bare']:.1f}×",
                f"RSS {statistics.median(rss) / 1e6:.1f} MB"),
               ("in-process", ms(med["alone"]), f"{med['alone'] / med['bare']:.1f}×", "")],
              ("", "median", "× bare", ""))
        activated = [activated_first_pong(script, tmp, procs) for _ in range(3)]
        if None in activated:
            print("  socket-activated first connection: skipped (no systemd-socket-activate)")
        else:
            results["front_activated_first_pong"] = statistics.median(activated)
            print("  first connection that starts a socket-activated daemon: "
                  + ", ".join(ms(v) for v in activated))
        count = args.front_pings
        print(f"  {count:,} pipelined pings, {args.front_pipe_runs} interleaved runs each")
        rates: dict[str, list[float]] = {"front": [], "alone": []}
        for _ in range(args.front_pipe_runs):
            rates["front"].append(pipelined_rate(front, procs, count))
            rates["alone"].append(pipelined_rate(alone, procs, count))
        for name, label in (("front", "front door"), ("alone", "in-process")):
            print(f"    {label}: {rate(statistics.median(rates[name])):>12}   ("
                  + ", ".join(rate(v) for v in rates[name]) + ")")
        results["front_pipelined"] = statistics.median(rates["front"])
        results["front_inprocess_pipelined"] = statistics.median(rates["alone"])


# ---------------------------------------------------------------------------------------------
# summary: every figure of the run next to its goal


def summary(r: dict) -> None:
    """One table of the run's figures, each with its goal (from the issues) and the ratio
    it is judged by; figures of sections that did not run are left out."""

    def row(label, key, fmt, goal="", judge=None, ratio=""):
        if key not in r:
            return None
        verdict = "" if judge is None else judge(r)  # "-": the comparison did not run
        if type(verdict) is bool:
            verdict = _met(verdict)
        return (label, fmt(r[key]), ratio, goal, verdict)

    def x(num, den):
        return f"{r[num] / r[den]:.1f}×" if num in r and den in r and r[den] else ""

    rows = [
        row("stdio: 20,000 pipelined pings", "stdio_pipelined", rate),
        row("front: exec → first pong through the front door", "front_first_pong", ms,
            "≤ 3× python -I -c pass",
            lambda r: r["front_first_pong"] <= 3 * r["front_bare"],
            x("front_first_pong", "front_bare") + " bare"),
        row("front: exec → first pong in-process", "front_inprocess_first_pong", ms,
            "≤ 5× python -I -c pass",
            lambda r: r["front_inprocess_first_pong"] <= 5 * r["front_bare"],
            x("front_inprocess_first_pong", "front_bare") + " bare"),
        row("front: RSS of the front process", "front_rss", lambda v: f"{v / 1e6:.1f} MB"),
        row("front: first pong starting a socket-activated daemon",
            "front_activated_first_pong", ms),
        row("front: pipelined pings through the front door", "front_pipelined", rate,
            "≥ 0.9× in-process",
            lambda r: r["front_pipelined"] >= 0.9 * r["front_inprocess_pipelined"],
            x("front_pipelined", "front_inprocess_pipelined")),
        row("ssh: connect + first reply (fresh)", "ssh_first_reply", ms),
        row("ssh: connect + first reply (ControlMaster)", "ssh_cm_first_reply", ms),
        row("tcp: connect + auth + first reply (p50)", "tcp_first_reply", ms,
            "≥ 100× faster than ssh ControlMaster",
            lambda r: "-" if "ssh_cm_first_reply" not in r
            else r["ssh_cm_first_reply"] >= 100 * r["tcp_first_reply"],
            x("ssh_cm_first_reply", "tcp_first_reply")),
        row("tcp: ping RTT p50 (ssh pipe: ratio)", "tcp_rtt_p50", us, "", None,
            x("ssh_rtt_p50", "tcp_rtt_p50")),
        row("tcp: 20,000 pipelined pings (stdio: ratio)", "tcp_pipelined", rate,
            "faster than stdio",
            lambda r: "-" if "stdio_pipelined" not in r
            else r["tcp_pipelined"] > r["stdio_pipelined"],
            x("tcp_pipelined", "stdio_pipelined")),
        row(f"tcp: authenticated connections/s ({r.get('tcp_auth_client', '?')})",
            "tcp_auth_rate", rate, "≥ 5,000/s", lambda r: r["tcp_auth_rate"] >= 5000),
        row("idle: RSS of all daemon processes", "idle_rss", lambda v: f"{v / 1e6:.0f} MB",
            "< 150 MB", lambda r: r["idle_rss"] < 150e6),
        row("idle: ping RTT p50 while held", "idle_rtt_p50", us),
        row("idle: ping RTT p99 while held", "idle_rtt_p99", us, "< 2 ms",
            lambda r: r["idle_rtt_p99"] < 2e-3),
        row("pty: keystroke echo p50", "pty_echo_p50", us, "< 1 ms",
            lambda r: r["pty_echo_p50"] < 1e-3),
        row("pty: keystroke echo p50, Python reference", "pyref_echo_p50", us,
            "cmuxd ≤ 1.1× it", lambda r: r["pty_echo_p50"] <= 1.1 * r["pyref_echo_p50"],
            x("pyref_echo_p50", "pty_echo_p50")),
        row("pty: keystroke echo p50 through ssh -tt", "ssh_echo_p50", us,
            "cmuxd ≤ it", lambda r: r["pty_echo_p50"] <= r["ssh_echo_p50"],
            x("ssh_echo_p50", "pty_echo_p50")),
        row("pty: keystroke echo p50 through ssh -tt", "ssh_echo_p50", us,
            "cmuxd ≥ 5× lower", lambda r: r["ssh_echo_p50"] >= 5 * r["pty_echo_p50"],
            x("ssh_echo_p50", "pty_echo_p50")),
        row("pty: keystroke echo p99 (ssh -tt: ratio)", "pty_echo_p99", us,
            "≤ 1.5× ssh -tt's", lambda r: r["pty_echo_p99"] <= 1.5 * r["ssh_echo_p99"],
            x("ssh_echo_p99", "pty_echo_p99")),
        row("pty: keystroke echo p50, C relay", "floor_echo_p50", us, "", None,
            x("floor_echo_p50", "pty_echo_p50")),
        row("pty: echo p50, 2nd attachment on another worker", "pty2_echo_p50", us, "", None,
            x("pty_echo_p50", "pty2_echo_p50")),
        row("pty: daemon CPU per keystroke round trip", "pty_echo_cpu", us),
        row("pty: the same, 2 attachments on 2 workers", "pty2_echo_cpu", us),
        row("pty: output throughput", "pty_throughput", mbps, "≥ 50 MB/s",
            lambda r: r["pty_throughput"] >= 50e6),
        row("pty: output throughput, Python reference", "pyref_throughput", mbps,
            "cmuxd ≥ 0.9× it", lambda r: r["pty_throughput"] >= 0.9 * r["pyref_throughput"],
            x("pty_throughput", "pyref_throughput")),
        row("pty: output throughput, bare os.read loop", "bare_throughput", mbps, "", None,
            x("pty_throughput", "bare_throughput")),
        row("pty: output throughput, C relay", "floor_throughput", mbps, "", None,
            x("pty_throughput", "floor_throughput")),
    ]
    rows = [row for row in rows if row is not None]
    if not rows:
        return
    print("\nsummary (× = how many times better cmuxd is)")
    table(rows, ("", "figure", "×", "goal", ""))
    print("  load average at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


# ---------------------------------------------------------------------------------------------


SECTIONS = {"stdio": stdio_section, "ssh": ssh_section, "tcp": tcp_section,
            "idle": idle_section, "pty": pty_section, "flood": flood_section,
            "frames": frames_section, "upgrade": upgrade_section, "front": front_section}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS),
                   help="comma-separated sections to run (default: %(default)s)")
    p.add_argument("--runs", type=int, default=7, help="stdio runs (default: %(default)s)")
    p.add_argument("--pings", type=int, default=20000,
                   help="pipelined pings per run (default: %(default)s)")
    p.add_argument("--connects", type=int, default=20,
                   help="ssh connections per connect figure (default: %(default)s)")
    p.add_argument("--rtt", type=int, default=1000,
                   help="sequential pings for the RTT figures (default: %(default)s)")
    p.add_argument("--pipe-runs", type=int, default=3,
                   help="pipelined runs over one ssh/tcp connection (default: %(default)s)")
    p.add_argument("--daemon", help="daemon command to benchmark instead of this venv's "
                   "`cmuxd-remote serve --stdio` (absolute path)")
    tcp = p.add_argument_group("tcp")
    tcp.add_argument("--tcp-connects", type=int, default=200,
                     help="connections for the connect figure (default: %(default)s)")
    tcp.add_argument("--auth-seconds", type=float, default=3.0,
                     help="duration of the connections/s figure (default: %(default)s)")
    tcp.add_argument("--auth-concurrency", type=int, default=64,
                     help="handshakes in flight for the connections/s figure "
                     "(default: %(default)s)")
    tcp.add_argument("--auth-procs", type=int, default=1,
                     help="client processes for the connections/s figure; they share the "
                     "machine's cores with the daemon, and one C client uses about a third "
                     "of a core, so more did not help (default: %(default)s)")
    tcp.add_argument("--auth-client", choices=("auto", "c", "python"), default="auto",
                     help="load generator for the connections/s figure: c (authload.c, built "
                     "with $CC/cc/gcc/clang), python (asyncio), auto: c when a compiler "
                     "exists (default: %(default)s)")
    tcp.add_argument("--workers", type=int, default=0, help="--workers for the daemon")
    tcp.add_argument("--tcp-addr", help="benchmark a running daemon on this loopback "
                     "HOST:PORT instead of starting one")
    tcp.add_argument("--token-file", help="its token (else $CMUX_RELAY_TOKEN)")
    tcp.add_argument("--relay-id", help="its relay id (else $CMUX_RELAY_ID)")
    idle = p.add_argument_group("idle")
    idle.add_argument("--idle-connections", type=int, default=10000,
                      help="authenticated idle connections to hold (default: %(default)s)")
    idle.add_argument("--idle-concurrency", type=int, default=64,
                      help="handshakes in flight while opening them (default: %(default)s)")
    idle.add_argument("--idle-pings", type=int, default=2000,
                      help="sequential pings while they are held (default: %(default)s)")
    flood = p.add_argument_group("flood")
    flood.add_argument("--flood-connections", type=int, default=1000,
                       help="idle pre-auth connections the attacker holds (default: %(default)s)")
    flood.add_argument("--flood-clients", type=int, default=100,
                       help="good clients timed per path and phase (default: %(default)s)")
    frames = p.add_argument_group("frames")
    frames.add_argument("--frames-pings", type=int, default=2000,
                        help="sequential pings per figure (default: %(default)s)")
    pty = p.add_argument_group("pty")
    pty.add_argument("--keystrokes", type=int, default=5000,
                     help="keystrokes per echo figure (default: %(default)s)")
    pty.add_argument("--echo-block", type=int, default=500,
                     help="keystrokes a side gets before the next side's turn "
                     "(default: %(default)s)")
    pty.add_argument("--pty-mib", type=int, default=64,
                     help="MiB that `cat` writes for the throughput figure (default: %(default)s)")
    pty.add_argument("--pty-runs", type=int, default=3,
                     help="runs of the throughput figure (default: %(default)s)")
    front = p.add_argument_group("front")
    front.add_argument("--front-runs", type=int, default=15,
                       help="interleaved runs of the exec → first pong figures "
                       "(default: %(default)s)")
    front.add_argument("--front-pings", type=int, default=200000,
                       help="pipelined pings per throughput run (default: %(default)s)")
    front.add_argument("--front-pipe-runs", type=int, default=3,
                       help="interleaved throughput runs per side (default: %(default)s)")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    print(f"cmuxd bench: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"{os.uname().sysname} {os.uname().release}, load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    results: dict = {}
    status = 0
    with ExitStack() as stack:
        for name in args.sections:
            procs = stack.enter_context(_closing(Processes()))
            print()
            try:
                SECTIONS[name](args, procs, results)
            except KeyboardInterrupt:
                print(f"\ninterrupted during {name}; cleaning up", file=sys.stderr)
                return 130
            except Exception as exc:
                traceback.print_exc()
                print(f"  {name} failed: {exc}", file=sys.stderr)
                status = 1
            finally:
                procs.close()
    summary(results)
    return status


@contextmanager
def _closing(procs: Processes) -> Iterator[Processes]:
    try:
        yield procs
    finally:
        procs.close()


if __name__ == "__main__":
    sys.exit(main())
