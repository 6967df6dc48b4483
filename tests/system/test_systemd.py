"""The units under a real systemd 252, booted as PID 1 of a PID and mount namespace.

The namespace shares the host's network, so the test connects to the socket unit's TCP port
directly and reaches its Unix socket through /proc/<PID 1>/root. systemd runs on an overlay of
the host's root whose writes land in a tmpfs (see boot-systemd.sh): booted on the real root
it would empty the host's /tmp. One boot serves the whole module; the tests run in order
and each leaves cmuxd.socket listening.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest

from cmuxd import __version__, units
from cmuxd.status import query_status
from helpers import FrameStream, wait_for, write_token_file
from listening import RELAY_ID, free_port, mac_for, proof_for, read_line

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BOOT_SCRIPT = HERE / "boot-systemd.sh"
TARGET = "cmuxd-test.target"
SYSTEMD = Path("/lib/systemd/systemd")
WATCHDOG_SEC = 3
RESTARTS = 3
TAILNET_ADDRESS = "192.0.2.1"  # TEST-NET-1: never a real host's; FreeBind lets it bind
TEST_USER = "cmuxd-test"
USER_RUNTIME = "/run/cmuxd-test-user"
PR_SET_PDEATHSIG = 1
HOST_ID = os.uname().nodename.split(".")[0]  # the relay id of a daemon given none


def unshare_refusal() -> str | None:
    """Why a systemd cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "booting systemd in a namespace needs root"
    for tool in ("unshare", "nsenter", "systemctl", "journalctl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt: util-linux, systemd)"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is not installed (apt: systemd)"
    probe = subprocess.run(["unshare", "-p", "-f", "-m", "--propagation", "private", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare of a PID and mount namespace is not permitted: {probe.stderr.strip()}"
    return None


def hidden_from_overlay(path: Path) -> bool:
    """The overlay shows only the root filesystem, and /tmp and /run are fresh inside."""
    path = path.resolve()
    if os.stat(path).st_dev != os.stat("/").st_dev:
        return True
    return any(path == Path(p) or Path(p) in path.parents for p in ("/tmp", "/run"))


def _die_with_parent():
    # If the test process dies, unshare dies, and --kill-child takes the namespace with it.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class BootedSystemd:
    def __init__(self):
        # Files systemd must read (units, token) go where the overlay shows them: not /tmp.
        parent = "/var/tmp" if os.access("/var/tmp", os.W_OK) else None
        self.work = Path(tempfile.mkdtemp(prefix="cmuxd-systemd-", dir=parent))
        self.base = self.work / f"root-{self.work.name}"
        self.base.mkdir()
        self.unit_dir = self.work / "units"
        self.unit_dir.mkdir()
        self.token_file = self.work / "relay-token"
        self.token = write_token_file(self.token_file)
        self.relay_id = RELAY_ID
        self.port = free_port()
        self.log_file = open(self.work / "boot.log", "w+b")
        self.unshare: subprocess.Popen | None = None
        self.pid1 = 0

    # setup and teardown

    def write_units(self) -> None:
        command = units.installed_command()
        rendered = units.SystemdUnits(
            "system", command, self.token_file, port=self.port,
            protect_home=units.protect_home_is_safe(command),
            tmp_binds=units.paths_under_tmp(command), tailnet=[TAILNET_ADDRESS],
            serve_args=["--workers", "2", "--relay-id", RELAY_ID]).render()
        # Only what a test needs to finish quickly differs from the installed units.
        # Tests start the service more often than StartLimitBurst= allows in real use.
        rendered["cmuxd.service.d/test.conf"] = (
            "[Unit]\nStartLimitIntervalSec=0\n"
            f"[Service]\nWatchdogSec={WATCHDOG_SEC}s\nTimeoutAbortSec=5s\nLimitCORE=0\n")
        rendered[TARGET] = ("[Unit]\nDescription=cmuxd test boot: nothing but the journal\n"
                            "Wants=systemd-journald.socket systemd-journald.service\n")
        # A user manager for an unprivileged account, run as user@.service runs one (which
        # itself would need logind and D-Bus here).
        rendered["cmuxd-test-user-manager.service"] = (
            f"[Unit]\nDescription=systemd --user for {TEST_USER}\n[Service]\nType=notify\n"
            f"User={TEST_USER}\nRuntimeDirectory={Path(USER_RUNTIME).name}\n"
            f"RuntimeDirectoryMode=0700\nEnvironment=XDG_RUNTIME_DIR={USER_RUNTIME}\n"
            f"Delegate=yes\nExecStart={SYSTEMD} --user --unit={TARGET}\n")
        for name, text in rendered.items():
            path = self.unit_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    def boot(self) -> None:
        self.write_units()
        needed = {REPO, Path(sys.prefix), Path(sys.base_prefix).resolve(),
                  Path(os.path.realpath(sys.executable)).parent, self.work}
        extra = sorted(str(p.resolve()) for p in needed if hidden_from_overlay(p))
        self.unshare = subprocess.Popen(
            ["unshare", "-p", "-f", "-m", "--propagation", "private", "--kill-child",
             str(BOOT_SCRIPT), str(self.base), str(self.unit_dir), TARGET, *extra],
            stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=self.log_file,
            preexec_fn=_die_with_parent)

        def pid1():
            if self.unshare.poll() is not None:
                raise AssertionError(f"the boot failed:\n{self.boot_log()}")
            for child in psutil.Process(self.unshare.pid).children():
                try:
                    if child.cmdline()[:2] == [str(SYSTEMD), "--system"]:
                        return child.pid
                except psutil.NoSuchProcess:
                    pass
            return None
        self.pid1 = wait_for(pid1, timeout=30, message="systemd to start")

        def running():
            state = self.nsenter("systemctl", "is-system-running").stdout.strip()
            return state in ("running", "degraded")
        wait_for(running, timeout=60, interval=0.05, message="systemd to finish booting")

    def teardown(self) -> None:
        if self.pid1:
            try:
                os.kill(self.pid1, signal.SIGKILL)  # PID 1 ignores SIGTERM
            except ProcessLookupError:
                pass
        if self.unshare is not None:
            try:
                self.unshare.wait(30)
            except subprocess.TimeoutExpired:
                self.unshare.kill()
                self.unshare.wait()
        self.log_file.close()
        self._remove_cgroups()
        self.base.rmdir()  # the tmpfs on it existed only in the namespace
        shutil.rmtree(self.work)

    def _remove_cgroups(self) -> None:
        record = Path(f"{self.base}.cgroup")
        if not record.exists():
            return
        relative = record.read_text().strip().lstrip("/")
        hierarchies = [line.split()[4] for line in open("/proc/self/mountinfo")
                       if " - cgroup" in line]
        roots = [Path(h) / relative for h in hierarchies if (Path(h) / relative).is_dir()]

        def removed():
            for root in roots:
                for directory, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
                    try:
                        os.rmdir(directory)
                    except FileNotFoundError:
                        pass
                    except OSError:
                        return False  # processes still leaving it
            return True
        wait_for(removed, timeout=30, interval=0.05, message="the boot's cgroups to empty")

    # driving it

    def nsenter(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        result = subprocess.run(["nsenter", "-t", str(self.pid1), "-m", "-p", "-r", *args],
                                capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}{result.stderr}\n{self.journal()}")
        return result

    def systemctl(self, *args: str) -> str:
        return self.nsenter("systemctl", *args, check=True).stdout

    def show(self, prop: str, unit: str = "cmuxd.service") -> str:
        return self.systemctl("show", "-p", prop, "--value", unit).strip()

    def journal(self, unit: str = "cmuxd.service", output: str = "cat") -> str:
        return self.nsenter("journalctl", "--no-pager", "-o", output, "-u", unit).stdout

    def boot_log(self) -> str:
        self.log_file.flush()
        return (self.work / "boot.log").read_text(errors="replace")

    def path(self, inside: str) -> Path:
        return Path(f"/proc/{self.pid1}/root{inside}")

    def main_pid(self) -> int:
        return int(self.show("MainPID"))

    def cmuxd_processes(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.Process(self.pid1).children(recursive=True):
            try:
                if any("cmuxd" in part for part in proc.cmdline()):
                    found.append(proc)
            except psutil.NoSuchProcess:
                pass
        return found

    # clients

    def authed(self, port: int | None = None, token: str | None = None,
               relay_id: str | None = None) -> FrameStream:
        token = token or self.token
        relay_id = relay_id or self.relay_id
        sock = socket.create_connection(("127.0.0.1", port or self.port), timeout=10)
        sock.settimeout(10)
        challenge = json.loads(read_line(sock))
        assert challenge["relay_id"] == relay_id
        client_nonce = secrets.token_hex(32)
        sock.sendall(json.dumps({"mac": mac_for(token, relay_id, challenge["nonce"]),
                                 "relay_id": relay_id,
                                 "client_nonce": client_nonce}).encode() + b"\n")
        reply = json.loads(read_line(sock))
        assert reply["ok"] is True, reply
        assert reply["relay_mac"] == proof_for(token, relay_id, client_nonce,
                                               challenge["nonce"])
        sock.settimeout(None)
        return FrameStream(sock)

    def unix(self, inside: str = "/run/cmuxd/cmuxd.sock") -> FrameStream:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(self.path(inside)))
        sock.settimeout(None)
        return FrameStream(sock)

    def control_status(self) -> dict:
        return query_status(self.path("/run/cmuxd/control.sock"), timeout=10)


@pytest.fixture(scope="module")
def systemd():
    reason = unshare_refusal()
    if reason is not None:
        print(f"\nsystem tests skipped: {reason}")
        pytest.skip(reason)
    booted = BootedSystemd()
    try:
        booted.boot()
        booted.systemctl("start", "cmuxd.socket")
        yield booted
    finally:
        booted.teardown()


def ping_ok(stream: FrameStream, id: int = 1) -> None:
    assert stream.call("ping", id=id) == {"id": id, "ok": True, "result": {"pong": True}}


def wait_serving(systemd: BootedSystemd) -> None:
    """The service is up (READY=1 was sent) with both workers alive."""
    def ready():
        if systemd.show("ActiveState") != "active" or systemd.show("SubState") != "running":
            return False
        return "2/2 workers" in systemd.show("StatusText")
    wait_for(ready, timeout=30, interval=0.05, message="cmuxd.service to be running")


def test_first_tcp_connection_starts_the_service(systemd):
    assert systemd.show("ActiveState", "cmuxd.socket") == "active"
    assert systemd.show("ActiveState") == "inactive"
    stream = systemd.authed()  # waits in the socket's backlog while the service starts
    ping_ok(stream)
    stream.close()
    wait_serving(systemd)
    assert "token from systemd credential /run/credentials/cmuxd.service/relay-token" \
        in systemd.journal()


def test_unix_socket_serves_without_handshake_and_is_private(systemd):
    stream = systemd.unix()
    ping_ok(stream)
    assert stream.call("hello", id=2)["result"]["name"] == "cmuxd-remote"
    stream.close()
    sock_path = systemd.path("/run/cmuxd/cmuxd.sock")
    assert sock_path.stat().st_mode & 0o777 == 0o600
    assert sock_path.parent.stat().st_mode & 0o777 == 0o700  # RuntimeDirectoryMode=


def test_main_pid_and_status_text(systemd):
    wait_serving(systemd)
    stream = systemd.authed()
    ping_ok(stream)
    status = systemd.control_status()
    assert systemd.main_pid() == status["pid"]  # both as seen inside the namespace
    assert sorted((l["kind"], l["address"], l["origin"]) for l in status["listeners"]) == [
        ("tcp", f"127.0.0.1:{systemd.port}", "systemd"),
        ("tcp", f"{TAILNET_ADDRESS}:{systemd.port}", "systemd"),  # the tailnet drop-in
        ("unix", "/run/cmuxd/cmuxd.sock", "systemd")]
    expected = "1 connection, 2/2 workers, listening on " + ", ".join(
        f"{l['kind']} {l['address']}" for l in status["listeners"])
    wait_for(lambda: systemd.show("StatusText") == expected, timeout=15, interval=0.1,
             message=f"StatusText {expected!r}")
    stream.close()
    wait_for(lambda: systemd.show("StatusText").startswith("0 connections, "), timeout=15,
             interval=0.1, message="StatusText to count the closed connection")


def test_reload_keeps_every_open_connection_serving(systemd):
    wait_serving(systemd)
    main_pid = systemd.main_pid()
    generation = systemd.control_status()["generation"]
    streams = [systemd.authed() for _ in range(3)] + [systemd.unix() for _ in range(2)]
    for i, stream in enumerate(streams):
        ping_ok(stream, id=i)
    systemd.systemctl("reload", "cmuxd.service")
    wait_for(lambda: systemd.control_status()["generation"] == generation + 1, timeout=15,
             message="the new worker generation")
    wait_serving(systemd)
    assert systemd.main_pid() == main_pid
    for i, stream in enumerate(streams):
        ping_ok(stream, id=100 + i)
        stream.close()
    ping_ok(systemd.authed(), id=200)
    assert "reloaded: generation" in systemd.journal()


def test_an_upgrade_reload_re_executes_the_supervisor_in_place(systemd):
    """The service runs a copy of the package (bound into its sandbox) whose version string
    changes; `systemctl reload` then execs the new code in the same main process, which
    says READY=1 again, while a client connecting all along sees no failure. A broken
    package after it is refused, and nothing changes: same process, same version, the
    session's output replayed with no gap."""
    site = systemd.work / "site"
    shutil.copytree(Path(units.__file__).parent, site / "cmuxd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    dropin = systemd.path("/run/systemd/system/cmuxd.service.d/upgrade.conf")
    dropin.write_text(f"[Service]\nEnvironment=PYTHONPATH={site}\nBindReadOnlyPaths={site}\n")
    systemd.systemctl("daemon-reload")
    systemd.systemctl("start", "cmuxd-hub.service")
    systemd.systemctl("restart", "cmuxd.service")
    loop = ConnectLoop(systemd)
    try:
        wait_serving(systemd)
        stream = systemd.authed()
        out = pty_output(stream, "upgraded",
                         "echo pid=$$; while :; do echo tick $((i+=1)); sleep 0.2; done",
                         until=b"tick 1\r\n")
        pid = int(out.split(b"pid=")[1].split()[0])
        main_pid = systemd.main_pid()
        loop.start()
        wait_for(lambda: loop.ok >= 20 or loop.failures, timeout=30,
                 message="the connect loop to get going")
        init = site / "cmuxd" / "__init__.py"
        init.write_text(init.read_text().replace(f'"{__version__}"', '"9.9.9"'))
        systemd.systemctl("reload", "cmuxd.service")
        wait_for(lambda: systemd.control_status()["version"] == "9.9.9", timeout=30,
                 message="the supervisor to run the new code")
        wait_serving(systemd)  # READY=1 again: the reload is over for systemd
        after = loop.ok
        wait_for(lambda: loop.ok >= after + 20 or loop.failures, timeout=30,
                 message="connections to the re-executed supervisor")
        assert systemd.main_pid() == main_pid
        assert "took over from" in systemd.journal()
        ping_ok(stream, id=5)  # opened before the reload: its old worker still serves it
        assert systemd.path(f"/proc/{pid}").exists()

        def replay(until: int) -> bytes:
            reattach = systemd.authed()
            try:
                return pty_output(reattach, "upgraded", None, until=b"tick %d\r\n" % until,
                                  require_existing=True)
            finally:
                reattach.close()

        seen = ticks(replay(1))[-1]
        generation = systemd.control_status()["generation"]
        init.write_text(init.read_text().replace('"9.9.9"', '"9.9.10"'))
        broken = site / "cmuxd" / "hub_process.py"
        broken.write_text(broken.read_text() + "\nraise ImportError('broken on purpose')\n")
        systemd.systemctl("reload", "cmuxd.service")
        wait_for(lambda: systemd.control_status()["counters"].get("reloads_refused") == 1,
                 timeout=30, message="the broken reload to be refused")
        wait_serving(systemd)  # READY=1 after the refusal too: systemd's reload job ends
        status = systemd.control_status()
        assert (status["version"], status["generation"]) == ("9.9.9", generation)
        assert systemd.main_pid() == main_pid
        assert "broken on purpose" in systemd.journal()
        after = loop.ok
        wait_for(lambda: loop.ok >= after + 20 or loop.failures, timeout=30,
                 message="connections after the refused reload")
        whole = replay(seen + 5)
        assert whole.startswith(b"pid=%d" % pid), whole[:100]
        numbers = ticks(whole)
        assert numbers == list(range(1, len(numbers) + 1)), numbers
    finally:
        loop.stop.set()
        loop.join(30)
        dropin.unlink()
        systemd.systemctl("daemon-reload")
        systemd.systemctl("restart", "cmuxd.service")
    assert loop.failures == [], f"{len(loop.failures)} of {loop.ok + len(loop.failures)} " \
                                f"attempts failed: {loop.failures[:5]}"


def test_a_new_token_takes_a_restart_under_the_unit(systemd):
    """systemd copies LoadCredential= files when the service starts, not on reload (252
    here): `systemctl reload` keeps the old token, `systemctl restart` takes the new one."""
    ping_ok(systemd.authed())  # starts the service if nothing did yet
    wait_serving(systemd)
    generation = systemd.control_status()["generation"]
    old = systemd.token
    inside = systemd.path(str(systemd.token_file))  # written through the overlay systemd sees
    inside.unlink()
    new = write_token_file(inside)
    systemd.systemctl("reload", "cmuxd.service")
    wait_for(lambda: systemd.control_status()["generation"] == generation + 1, timeout=15,
             message="the new worker generation")
    ping_ok(systemd.authed(token=old))
    systemd.systemctl("restart", "cmuxd.service")
    systemd.token = new
    wait_serving(systemd)
    ping_ok(systemd.authed())
    with pytest.raises(AssertionError):
        systemd.authed(token=old)


def test_token_rotate_reaches_the_service_without_a_restart(systemd):
    """`token rotate` under the --system unit: the credential is a snapshot taken at start,
    so the new token reaches the running service over its control socket; no restart, the
    old token works for the grace period only, and a reload does not bring it back."""
    ping_ok(systemd.authed())
    wait_serving(systemd)
    main_pid = systemd.main_pid()
    old = systemd.token
    opened = systemd.authed(token=old)
    rotated = systemd.nsenter(*units.installed_command(), "token", "rotate",
                              str(systemd.token_file), "--grace", "3", "--state-dir",
                              "/run/cmuxd", check=True)
    assert "the daemon uses the new one now" in rotated.stdout
    new = systemd.path(str(systemd.token_file)).read_text().strip()
    assert new != old
    assert systemd.path(str(systemd.token_file)).stat().st_mode & 0o777 == 0o600
    ping_ok(systemd.authed(token=new))
    ping_ok(systemd.authed(token=old))  # within the grace period
    assert systemd.control_status()["previous_token_until"] is not None

    def old_refused():
        try:
            systemd.authed(token=old).close()
            return False
        except AssertionError:
            return True
    wait_for(old_refused, timeout=15, interval=0.2, message="the old token's grace to end")
    systemd.token = new
    generation = systemd.control_status()["generation"]
    systemd.systemctl("reload", "cmuxd.service")
    wait_for(lambda: systemd.control_status()["generation"] == generation + 1, timeout=15,
             message="the new worker generation")
    ping_ok(systemd.authed())
    assert old_refused()
    assert systemd.main_pid() == main_pid
    ping_ok(opened, id=7)  # authenticated with the old token before the rotation
    opened.close()
    journal = systemd.journal()
    assert "relay token rotated" in journal and "keeping the rotated one" in journal
    assert old not in journal and new not in journal


def test_a_pty_shell_runs_in_the_hub_unit_outside_the_daemons_sandbox(systemd):
    """cmuxd.service has a private /tmp; the shells, children of cmuxd-hub.service, see the
    host's."""
    wait_serving(systemd)
    stream = systemd.authed()
    out = pty_output(stream, "sandbox",
                     "echo shell=$$; echo hi > /tmp/cmuxd-probe && echo tmp=ok; exec sleep 60",
                     until=b"tmp=ok")
    assert systemd.path("/tmp/cmuxd-probe").read_text() == "hi\n"
    shell = int(out.split(b"shell=")[1].split()[0])
    assert unit_of(systemd, shell) == "cmuxd-hub.service"
    stream.close()


def pty_output(stream: FrameStream, session: str, command: str | None, until: bytes,
               timeout: float = 15, **params) -> bytes:
    """Attach to `session` (starting it with `command`) and read its output until `until`."""
    ident = {"session_id": session, "attachment_id": secrets.token_hex(4),
             "client_attachment_token": "t"}
    if command is not None:
        params["command"] = command
    stream.send({"id": 1, "method": "pty.attach",
                 "params": {**ident, "cols": 80, "rows": 24, **params}})
    out = b""
    while until not in out:
        event = stream.next_event(timeout=timeout)
        if event["event"] == "pty.exit":
            raise AssertionError(f"the session ended: {event}; output {out[-500:]!r}")
        if event["event"] == "pty.data":
            out += base64.b64decode(event["data_base64"])
    response = stream.next_response()
    assert response.get("ok"), response
    return out


def unit_of(systemd: BootedSystemd, pid: int) -> str:
    """The unit whose cgroup holds a process (pid as seen inside the boot)."""
    cgroup = systemd.path(f"/proc/{pid}/cgroup").read_text()
    return cgroup.strip().splitlines()[-1].rsplit("/", 1)[-1]


class ConnectLoop(threading.Thread):
    """Connect, authenticate, ping, close: again and again, counting every failed attempt."""

    def __init__(self, systemd: BootedSystemd):
        super().__init__(daemon=True)
        self.systemd = systemd
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                stream = self.systemd.authed()
                ping_ok(stream)
                stream.close()
                self.ok += 1
            except Exception as exc:  # noqa: BLE001 - every failure is what we count
                self.failures.append(repr(exc))


def test_restart_loses_no_connection_attempt(systemd):
    wait_serving(systemd)
    old_pid = systemd.main_pid()
    loop = ConnectLoop(systemd)
    loop.start()
    try:
        wait_for(lambda: loop.ok >= 20 or loop.failures, timeout=30,
                 message="the connect loop to get going")
        for _ in range(RESTARTS):
            systemd.systemctl("restart", "cmuxd.service")
            wait_for(lambda: systemd.main_pid() not in (0, old_pid), timeout=30,
                     message="a new main process")
            old_pid = systemd.main_pid()
            after_restart = loop.ok
            wait_for(lambda: loop.ok >= after_restart + 20 or loop.failures, timeout=30,
                     message="connections to the new process")
    finally:
        loop.stop.set()
        loop.join(30)
    assert loop.failures == [], f"{len(loop.failures)} of {loop.ok + len(loop.failures)} " \
                                f"attempts failed: {loop.failures[:5]}"
    wait_serving(systemd)


def test_stop_exits_promptly_and_leaves_no_process(systemd):
    wait_serving(systemd)
    stream = systemd.authed()  # an open connection must not hold the stop up
    ping_ok(stream)
    assert len(systemd.cmuxd_processes()) >= 3  # supervisor, workers (and the hub)
    stopper = subprocess.Popen(["nsenter", "-t", str(systemd.pid1), "-m", "-p", "-r",
                                "systemctl", "stop", "cmuxd.service"])
    wait_for(lambda: stopper.poll() is not None, timeout=10, interval=0.05,
             message="`systemctl stop` to return")
    assert stopper.returncode == 0
    assert systemd.show("ActiveState") == "inactive"
    assert systemd.show("Result") == "success"
    left = [p.pid for p in systemd.cmuxd_processes()
            if "/cmuxd.service" in Path(f"/proc/{p.pid}/cgroup").read_text()]
    assert left == []
    assert systemd.show("ActiveState", "cmuxd-hub.service") == "active"  # the sessions' owner
    assert stream.at_eof()
    stream.close()
    # The socket stays: the next connection starts the service again.
    assert systemd.show("ActiveState", "cmuxd.socket") == "active"
    ping_ok(systemd.authed())
    wait_serving(systemd)


def test_watchdog_restarts_a_supervisor_that_stopped_answering(systemd):
    wait_serving(systemd)
    old_pid = systemd.main_pid()
    restarts = int(systemd.show("NRestarts"))
    systemd.nsenter("kill", "-STOP", str(old_pid), check=True)
    wait_for(lambda: int(systemd.show("NRestarts")) > restarts, timeout=WATCHDOG_SEC * 5,
             interval=0.1, message="the watchdog to restart the service")
    wait_serving(systemd)
    assert systemd.main_pid() != old_pid
    ping_ok(systemd.authed())
    assert "Watchdog timeout" in systemd.journal(output="short")


def test_journal_carries_the_log_and_never_the_token(systemd):
    text = systemd.journal()
    assert f"listening on tcp 127.0.0.1:{systemd.port} (systemd, relay-token auth)" in text
    assert "listening on unix /run/cmuxd/cmuxd.sock (systemd, peer uid check)" in text
    assert "worker 0 started" in text
    assert systemd.token not in systemd.journal(output="verbose")
    records = [json.loads(line) for line in systemd.journal(output="json").splitlines()]
    ours = [r for r in records if "serving with 2 workers" in str(r.get("MESSAGE"))]
    assert ours and all(r.get("_SYSTEMD_UNIT") == "cmuxd.service" for r in ours)


def unprivileged_account(systemd: BootedSystemd) -> tuple[int, list[str]]:
    """An unprivileged account inside the boot (in the overlay's /etc/passwd), able to run
    this installation; (uid, argv prefix that runs a command as it)."""
    if systemd.nsenter("id", "-u", TEST_USER).returncode != 0:
        systemd.nsenter("useradd", "--create-home", "--shell", "/bin/sh", TEST_USER,
                        check=True)
        # Let the account reach this installation (a pyenv under /root, say); the overlay
        # takes the change, the host keeps its modes.
        for target in (Path(os.path.realpath(sys.executable)), Path(sys.prefix), REPO):
            for directory in target.parents:
                if directory != Path("/"):
                    systemd.nsenter("chmod", "o+x", str(directory))
    uid = int(systemd.nsenter("id", "-u", TEST_USER, check=True).stdout)
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--init-groups", "env",
               f"HOME=/home/{TEST_USER}", f"USER={TEST_USER}", f"XDG_RUNTIME_DIR={USER_RUNTIME}"]
    command = units.installed_command()
    probe = systemd.nsenter(*as_user, *command, "version")
    if probe.returncode != 0:
        reason = f"{TEST_USER} cannot run {command[0]}: {probe.stderr.strip()[-200:]}"
        print(f"\ntest skipped: {reason}")
        pytest.skip(reason)
    return uid, as_user


def test_units_install_user_serves_an_unprivileged_user(systemd):
    """The README's first lines, as a user without privileges: `units install --systemd
    --user`, then `systemctl --user enable --now cmuxd.socket`, then connect."""
    uid, as_user = unprivileged_account(systemd)
    command = units.installed_command()
    user_units = systemd.path("/run/systemd/user")
    user_units.mkdir(exist_ok=True)
    (user_units / TARGET).write_text("[Unit]\nDescription=cmuxd test user boot\n")
    systemd.systemctl("start", "cmuxd-test-user-manager.service")

    port = free_port()
    installed = systemd.nsenter(*as_user, *command, "units", "install", "--systemd", "--user",
                                "--port", str(port), check=True).stdout
    assert "systemctl --user enable --now cmuxd.socket" in installed
    systemd.nsenter(*as_user, "systemctl", "--user", "daemon-reload", check=True)
    systemd.nsenter(*as_user, "systemctl", "--user", "enable", "--now", "cmuxd.socket",
                    check=True)
    # Without --at-boot a user service waits for its first connection.
    assert systemd.nsenter(*as_user, "systemctl", "--user", "is-active",
                           "cmuxd.service").stdout.strip() == "inactive"
    token = systemd.path(f"/home/{TEST_USER}/.config/cmuxd/relay-token").read_text().strip()
    stream = systemd.authed(port=port, token=token, relay_id=os.uname().nodename.split(".")[0])
    ping_ok(stream)

    def user_show(prop):
        return systemd.nsenter(*as_user, "systemctl", "--user", "show", "-p", prop, "--value",
                               "cmuxd.service", check=True).stdout.strip()
    wait_for(lambda: "1 connection, 2/2 workers" in user_show("StatusText"), timeout=15,
             interval=0.1, message="the user service's StatusText")
    stream.close()
    main_pid = user_show("MainPID")
    status = systemd.path(f"/proc/{main_pid}/status").read_text()
    assert f"Uid:\t{uid}\t" in status
    unix = systemd.unix(f"{USER_RUNTIME}/cmuxd/cmuxd.sock")
    ping_ok(unix)
    unix.close()
    log = systemd.nsenter("journalctl", "--no-pager", "-o", "cat", f"_UID={uid}").stdout
    assert (f"token from systemd credential {USER_RUNTIME}/credentials/cmuxd.service/"
            "relay-token") in log
    assert token not in log


def test_units_install_system_as_another_user(systemd):
    """`units install --systemd --system --as USER`, run inside the boot (its /etc is the
    overlay's): the service runs as USER with a token file only root can read."""
    uid, _ = unprivileged_account(systemd)
    systemd.systemctl("stop", "cmuxd.service", "cmuxd.socket", "cmuxd-hub.service")
    port = free_port()
    command = units.installed_command()
    installed = systemd.nsenter(*command, "units", "install", "--systemd", "--system", "--as",
                                TEST_USER, "--port", str(port), check=True).stdout
    assert "wrote /etc/systemd/system/cmuxd.service" in installed
    token_file = systemd.path("/etc/cmuxd/relay-token")
    assert token_file.stat().st_uid == 0 and token_file.stat().st_mode & 0o777 == 0o600
    # The next steps it prints (/etc/systemd/system then overrides the test's units): the
    # service is enabled for boot and runs before any connection.
    steps = installed.split("next:\n", 1)[1].split("\n")
    assert [s.strip() for s in steps if s.strip()] == [
        "systemctl daemon-reload", "systemctl enable --now cmuxd.socket cmuxd.service"]
    systemd.systemctl("daemon-reload")
    systemd.systemctl("enable", "--now", "cmuxd.socket", "cmuxd.service")
    assert systemd.systemctl("is-enabled", "cmuxd.service").strip() == "enabled"
    assert "multi-user.target" in systemd.show("WantedBy")
    wait_for(lambda: systemd.show("SubState") == "running"
             and "0 connections" in systemd.show("StatusText"), timeout=30, interval=0.1,
             message="the enabled service to run with no connection yet")
    stream = systemd.authed(port=port, token=token_file.read_text().strip(), relay_id=HOST_ID)
    ping_ok(stream)
    wait_for(lambda: "1 connection, " in systemd.show("StatusText"), timeout=15, interval=0.1,
             message="the service to count the connection")
    status = systemd.path(f"/proc/{systemd.main_pid()}/status").read_text()
    assert f"Uid:\t{uid}\t" in status
    sock = systemd.path("/run/cmuxd/cmuxd.sock")
    assert sock.stat().st_uid == uid and sock.stat().st_mode & 0o777 == 0o600
    assert sock.parent.stat().st_uid == uid and sock.parent.stat().st_mode & 0o777 == 0o700
    unix = systemd.unix()  # root may connect too
    ping_ok(unix)
    unix.close()
    stream.close()
    assert "token from systemd credential" in systemd.journal()
    systemd.port, systemd.token, systemd.relay_id = port, token_file.read_text().strip(), HOST_ID



def wait_active(systemd: BootedSystemd, unit: str = "cmuxd.service") -> None:
    wait_for(lambda: systemd.show("SubState", unit) == "running", timeout=30, interval=0.05,
             message=f"{unit} to run")


def test_a_shell_under_the_system_units_is_like_an_ssh_login_of_its_user(systemd):
    """Run by the units `install --system --as` wrote (the test before): home writable, the
    host's /tmp, sudo for a user allowed it, the user's other processes in ps."""
    uid, as_user = unprivileged_account(systemd)
    wait_active(systemd)
    sudoers = systemd.path(f"/etc/sudoers.d/{TEST_USER}")
    sudoers.write_text(f"{TEST_USER} ALL=(ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    outside = f"/tmp/cmuxd-outside-{secrets.token_hex(4)}"
    systemd.path(outside).write_text("made outside\n")
    systemd.path(outside).chmod(0o644)
    other = subprocess.Popen(["nsenter", "-t", str(systemd.pid1), "-m", "-p", "-r", *as_user,
                              "sh", "-c", "echo $$; exec sleep 300"],
                             stdout=subprocess.PIPE, text=True)
    try:
        other_pid = int(other.stdout.readline())
        stream = systemd.authed()
        out = pty_output(stream, "login", (
            "echo uid=$(id -u) home=$HOME; touch ~/cmuxd-probe && echo home=writable; "
            f"cat {outside}; echo made inside > /tmp/cmuxd-inside; "
            "sudo -n true && echo sudo=works; "
            "echo ps=$(ps -o pid= -u " + TEST_USER + " | tr -s ' \\n' ,); echo end=1"),
            until=b"end=1").decode(errors="replace")
        stream.close()
    finally:
        other.kill()
        other.wait()
    assert f"uid={uid} home=/home/{TEST_USER}" in out
    assert "home=writable" in out
    assert systemd.path(f"/home/{TEST_USER}/cmuxd-probe").stat().st_uid == uid
    assert "made outside" in out
    assert systemd.path("/tmp/cmuxd-inside").read_text() == "made inside\n"
    assert "sudo=works" in out, out
    ps = out.split("ps=", 1)[1].split()[0]
    assert str(other_pid) in ps.split(","), out


def ticks(output: bytes) -> list[int]:
    return [int(line.split()[1]) for line in output.decode(errors="replace").splitlines()
            if line.startswith("tick ") and len(line.split()) == 2 and line.split()[1].isdigit()]


def test_restarts_and_reloads_keep_a_running_session_and_replay_it_whole(systemd):
    wait_active(systemd)
    hub_pid = int(systemd.show("MainPID", "cmuxd-hub.service"))
    stream = systemd.authed()
    counter = "echo pid=$$; while :; do echo tick $((i+=1)); sleep 0.2; done"
    out = pty_output(stream, "counter", counter, until=b"tick 3\r\n")
    pid = int(out.split(b"pid=")[1].split()[0])
    assert unit_of(systemd, pid) == "cmuxd-hub.service"
    stream.close()
    seen = ticks(out)[-1]

    def reattach() -> bytes:
        """The whole ring again, up to a tick printed after this call."""
        stream = systemd.authed()
        try:
            return pty_output(stream, "counter", None, until=f"tick {seen + 5}\r\n".encode(),
                              require_existing=True)
        finally:
            stream.close()

    def check(replay: bytes) -> int:
        assert replay.startswith(b"pid=%d" % pid), replay[:100]
        numbers = ticks(replay)
        assert numbers[:1] == [1] and numbers == list(range(1, len(numbers) + 1)), numbers
        return numbers[-1]

    for _ in range(RESTARTS):
        old = systemd.main_pid()
        systemd.systemctl("restart", "cmuxd.service")
        wait_for(lambda: systemd.main_pid() not in (0, old), timeout=30,
                 message="a new main process")
        wait_active(systemd)
        replay = wait_for(lambda: _or_none(reattach), timeout=30,
                          message="the new daemon to adopt the hub")
        seen = check(replay)
    assert int(systemd.show("MainPID", "cmuxd-hub.service")) == hub_pid

    systemd.systemctl("reload", "cmuxd.service")
    wait_for(lambda: "upgraded in place" in systemd.journal("cmuxd-hub.service"), timeout=30,
             message="the hub to upgrade in place")
    wait_for(lambda: systemd.show("SubState", "cmuxd-hub.service") == "running", timeout=30)
    replay = wait_for(lambda: _or_none(reattach), timeout=30, message="a reattach after reload")
    seen = check(replay)
    assert int(systemd.show("MainPID", "cmuxd-hub.service")) == hub_pid
    assert systemd.path(f"/proc/{pid}").exists()

    stream = systemd.authed()
    pty_output(stream, "counter", None, until=f"tick {seen + 2}\r\n".encode(),
               require_existing=True)
    systemd.systemctl("stop", "cmuxd-hub.service")
    assert stream.next_event("pty.exit", timeout=15)
    stream.close()
    assert not systemd.path(f"/proc/{pid}").exists()
    assert systemd.show("ActiveState", "cmuxd-hub.service") == "inactive"
    assert systemd.show("ActiveState") == "active"  # the daemon goes on, without sessions


def test_a_sigkill_of_the_hub_loses_no_session(systemd):
    """The fd store keeps each session's PTY and ring, KillMode=process keeps the shells:
    the restarted hub adopts the session, whose output goes on with no gap."""
    systemd.systemctl("start", "cmuxd.service", "cmuxd-hub.service")
    wait_active(systemd)
    wait_active(systemd, "cmuxd-hub.service")
    stream = systemd.authed()
    counter = "echo pid=$$; while :; do echo tick $((i+=1)); sleep 0.2; done"
    out = pty_output(stream, "survivor", counter, until=b"tick 3\r\n")
    pid = int(out.split(b"pid=")[1].split()[0])
    seen = ticks(out)[-1]
    assert int(systemd.show("NFileDescriptorStore", "cmuxd-hub.service")) >= 3
    old_hub = int(systemd.show("MainPID", "cmuxd-hub.service"))
    systemd.systemctl("kill", "--signal=KILL", "--kill-who=main", "cmuxd-hub.service")
    # The attachment ends with the hub's link; its connection stays usable.
    assert stream.next_event("pty.exit", timeout=15)["session_id"] == "survivor"
    stream.close()
    wait_for(lambda: int(systemd.show("MainPID", "cmuxd-hub.service")) not in (0, old_hub),
             timeout=30, message="the hub to be restarted")
    assert systemd.path(f"/proc/{pid}").exists()

    def reattach() -> bytes:
        stream = systemd.authed()
        try:
            return pty_output(stream, "survivor", None, until=f"tick {seen + 10}\r\n".encode(),
                              require_existing=True)
        finally:
            stream.close()

    replay = wait_for(lambda: _or_none(reattach), timeout=30,
                      message="the session to be adopted by the new hub")
    assert replay.startswith(b"pid=%d" % pid), replay[:100]
    numbers = ticks(replay)
    assert numbers == list(range(1, len(numbers) + 1)), numbers
    assert "1 session(s) adopted" in systemd.journal("cmuxd-hub.service")
    assert unit_of(systemd, pid) == "cmuxd-hub.service"

    stream = systemd.authed()
    pty_output(stream, "survivor", None, until=f"tick {numbers[-1] + 1}\r\n".encode(),
               require_existing=True)
    stream.send({"id": 2, "method": "pty.close", "params": {"session_id": "survivor"}})
    assert stream.next_event("pty.exit", timeout=15)
    stream.close()
    wait_for(lambda: not systemd.path(f"/proc/{pid}").exists(), timeout=15,
             message="the adopted session's process to end on pty.close")
    wait_for(lambda: systemd.show("NFileDescriptorStore", "cmuxd-hub.service") == "0",
             timeout=15, message="the ended session to leave the fd store")


def _or_none(attempt):
    try:
        return attempt()
    except (AssertionError, OSError, TimeoutError):
        return None
