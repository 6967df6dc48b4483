"""The daemon's launchd code path, run for real on a machine without launchd.

tests/fixtures/fake_launchd.c, built here with the machine's C compiler, exports
launch_activate_socket(3) with launchd's prototype and hands out listening sockets this test
opened (as launchd opens what the plist's Sockets dictionary declares) and passed down to the
daemon. The daemon loads it through Config.launchd_library, the parameter that names the
library exporting that function, and serves what it is given with the same checks as for
systemd.
"""

from __future__ import annotations

import errno
import json
import os
import plistlib
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cmuxd import units
from cmuxd.supervisor.activation import LAUNCHD_SOCKET_NAMES

from helpers import wait_for, write_token_file
from listening import RELAY_ID, ListeningDaemon, free_port

REPO = Path(__file__).resolve().parents[2]
FAKE_SOURCE = REPO / "tests" / "fixtures" / "fake_launchd.c"
CC = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (apt: gcc) to build the "
                                                   "launch_activate_socket(3) stand-in")

# `serve` with the one option the CLI does not have: the library to ask for sockets.
DRIVER = ("import json, sys; from cmuxd.logs import setup_logging; "
          "from cmuxd.config import Config; from cmuxd.supervisor import run_daemon; "
          "setup_logging(); sys.exit(run_daemon(Config(**json.loads(sys.argv[1]))))")


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("launchd") / "libfakelaunchd.so"
    subprocess.run([CC, "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(path),
                    str(FAKE_SOURCE)], check=True, capture_output=True, timeout=120)
    return str(path)


def tcp_listener(family=socket.AF_INET, host="127.0.0.1") -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(16)
    return sock


def unix_listener(path: Path, mode: int = 0o600) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, mode)
    sock.listen(16)
    return sock


class LaunchedDaemon(ListeningDaemon):
    """The daemon as launchd starts it: sockets opened beforehand, named in
    FAKE_LAUNCHD_SOCKETS; --tcp names a port that must stay unbound when they are used."""

    def __init__(self, library: str | None, sockets: dict[str, list[socket.socket]] | None,
                 *, errors: dict[str, int] | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="cmuxd-test-"))
        self.token_file = self.dir / "relay-token"
        self.token = write_token_file(self.token_file)
        self.state_dir = self.dir / "state"
        self.asked_file = self.dir / "asked"
        self.flag_port = free_port()
        self.port = self.flag_port
        self.socket_path = None
        self.stderr_file = open(self.dir / "stderr.log", "w+b")
        env = {k: v for k, v in os.environ.items()
               if k not in ("CMUX_RELAY_TOKEN", "CMUX_RELAY_ID", "LISTEN_FDS", "LISTEN_PID")}
        env.update(HOME=str(self.dir), FAKE_LAUNCHD_ASKED=str(self.asked_file))
        passed = []
        if sockets is not None or errors:
            entries = [f"{name}={','.join(str(s.fileno()) for s in socks)}"
                       for name, socks in (sockets or {}).items()]
            entries += [f"{name}=!{code}" for name, code in (errors or {}).items()]
            env["FAKE_LAUNCHD_SOCKETS"] = " ".join(entries)
            passed = [s.fileno() for socks in (sockets or {}).values() for s in socks]
        self.env = env
        config = {"tcp": [f"127.0.0.1:{self.flag_port}"], "workers": 2,
                  "token_file": str(self.token_file), "relay_id": RELAY_ID,
                  "state_dir": str(self.state_dir), "launchd_library": library}
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(config)],
                                     stdin=subprocess.DEVNULL, stdout=self.stderr_file,
                                     stderr=self.stderr_file, env=env, pass_fds=passed)

    def asked(self) -> list[str]:
        return self.asked_file.read_text().split() if self.asked_file.exists() else []


@pytest.fixture
def launch():
    started, sockets = [], []

    def make(library, socks=None, **kwargs) -> LaunchedDaemon:
        d = LaunchedDaemon(library, socks, **kwargs)
        started.append(d)
        sockets.extend(s for group in (socks or {}).values() for s in group)
        return d

    yield make
    for d in started:
        d.close()
    for s in sockets:
        s.close()


def ping_ok(stream, id=1):
    assert stream.call("ping", id=id) == {"id": id, "ok": True, "result": {"pong": True}}


def unbound(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_named_sockets_are_adopted_and_served(launch, library, tmp_path):
    v4, v6 = tcp_listener(), tcp_listener(socket.AF_INET6, "::1")
    unix = unix_listener(tmp_path / "cmuxd.sock")
    d = launch(library, {"tcp": [v4, v6], "unix": [unix]})
    # A connection made before the daemon runs waits in the backlog launchd holds.
    early = d.authed(port=v4.getsockname()[1])
    d.wait_ready()
    ping_ok(early)
    ping_ok(d.authed("::1", v6.getsockname()[1]), id=2)
    d.socket_path = tmp_path / "cmuxd.sock"
    ping_ok(d.unix(), id=3)
    listeners = d.status()["listeners"]
    assert sorted((l["kind"], l["origin"], l["address"]) for l in listeners) == sorted([
        ("tcp", "launchd", f"127.0.0.1:{v4.getsockname()[1]}"),
        ("tcp", "launchd", f"[::1]:{v6.getsockname()[1]}"),
        ("unix", "launchd", str(tmp_path / "cmuxd.sock"))])
    assert d.asked() == list(LAUNCHD_SOCKET_NAMES)
    assert "using 3 socket(s) passed by launchd; --tcp/--socket addresses are not bound" in d.log()
    assert unbound(d.flag_port)
    early.close()
    assert d.stop() == 0
    assert d.token not in d.log()


def test_the_plist_sockets_are_the_names_the_daemon_asks_for(launch, library, tmp_path):
    """Open what the shipped plist's Sockets dictionary declares (on free addresses), name
    them as it does, and the daemon serves every one of them."""
    plist = plistlib.loads((REPO / "units" / "cmuxd.plist").read_bytes())
    rendered = plistlib.loads(units.render_plist(["/x/cmuxd-remote"], tmp_path / "token",
                                                 tmp_path / "s.sock", tmp_path / "log"))
    assert set(plist["Sockets"]) == set(rendered["Sockets"]) == set(LAUNCHD_SOCKET_NAMES)
    opened = {}
    for name, entry in plist["Sockets"].items():
        assert entry["SockType"] == "stream"
        if "SockPathName" in entry:
            opened[name] = [unix_listener(tmp_path / f"{name}.sock", entry["SockPathMode"])]
        else:
            assert entry["SockFamily"] == "IPv4"
            opened[name] = [tcp_listener(socket.AF_INET, entry["SockNodeName"])]
    d = launch(library, opened)
    d.wait_ready()
    assert sorted(d.asked()) == sorted(plist["Sockets"])
    assert sorted((l["kind"], l["origin"]) for l in d.status()["listeners"]) == [
        ("tcp", "launchd"), ("unix", "launchd")]
    ping_ok(d.authed(port=opened["tcp"][0].getsockname()[1]))


def test_a_plist_without_the_unix_socket_serves_tcp_and_says_so(launch, library):
    v4 = tcp_listener()
    d = launch(library, {"tcp": [v4]})
    d.wait_ready()
    ping_ok(d.authed(port=v4.getsockname()[1]))
    assert [l["origin"] for l in d.status()["listeners"]] == ["launchd"]
    assert "launchd passed no socket named 'unix'" in d.log()
    assert unbound(d.flag_port)


def test_not_started_by_launchd_binds_the_flags(launch, library):
    """ESRCH: the library is there but launchd does not manage this process."""
    d = launch(library, None)
    d.wait_ready()
    assert "launchd did not start this process; binding --tcp/--socket" in d.log()
    assert [l["origin"] for l in d.status()["listeners"]] == ["bound"]
    ping_ok(d.authed(port=d.flag_port))


def test_a_plist_with_neither_name_binds_the_flags(launch, library):
    other = tcp_listener()
    d = launch(library, {"Listeners": [other]})
    d.wait_ready()
    assert "launchd passed no socket named 'tcp' or 'unix'" in d.log()
    assert [l["origin"] for l in d.status()["listeners"]] == ["bound"]
    ping_ok(d.authed(port=d.flag_port))


@pytest.mark.parametrize("code", [errno.EALREADY, errno.EPERM])
def test_other_launchd_errors_stop_the_daemon_in_one_sentence(launch, library, code):
    v4 = tcp_listener()
    d = launch(library, {"tcp": [v4]}, errors={"unix": code})
    assert d.proc.wait(15) == 1
    errors = [line for line in d.log().splitlines() if "launchd" in line]
    assert len(errors) == 1, d.log()
    assert (f"launchd could not hand over the socket 'unix' ({os.strerror(code)}, "
            f"{errno.errorcode[code]}); check the Sockets dictionary") in errors[0]
    assert d.token not in d.log()
    # The socket it was given is untouched: launchd keeps it for the next start.
    probe = socket.create_connection(v4.getsockname(), timeout=5)
    probe.close()


def test_a_datagram_socket_from_launchd_names_the_plist_setting(launch, library):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    d = launch(library, {"tcp": [udp]})
    assert d.proc.wait(15) == 1
    assert "launchd socket 'tcp'" in d.log()
    assert "is not a stream socket; set SockType to stream in the plist's Sockets entry" in d.log()


def test_a_library_without_the_function_is_refused(launch, tmp_path):
    empty = tmp_path / "empty.c"
    empty.write_text("int unrelated(void) { return 0; }\n")
    lib = tmp_path / "libempty.so"
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(lib), str(empty)], check=True,
                   timeout=120)
    d = launch(str(lib))
    assert d.proc.wait(15) == 1
    assert f"{lib} does not export launch_activate_socket; name the library that does" in d.log()
    missing = launch(str(tmp_path / "nowhere.so"))
    assert missing.proc.wait(15) == 1
    wait_for(lambda: "cannot load" in missing.log(), timeout=5)
    assert "name a shared library that exports launch_activate_socket(3)" in missing.log()
