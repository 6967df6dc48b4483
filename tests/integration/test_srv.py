"""`_cmux._tcp` SRV lookups against a real DNS server (dnsmasq).

The lookup is asked directly of dnsmasq on a loopback port (the `nameservers` parameter);
the client end to end runs in a network namespace of its own, where `ip netns exec` puts a
resolv.conf naming the dnsmasq of that namespace, so the client finds it as it finds the
system's resolver anywhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cmuxd import srv

from helpers import daemon_command, stop_process, wait_for, write_token_file
from listening import RELAY_ID
from netns import ip, netns_permitted

DNSMASQ = shutil.which("dnsmasq") or (os.path.exists("/usr/sbin/dnsmasq") and "/usr/sbin/dnsmasq")
pytestmark = pytest.mark.skipif(not DNSMASQ, reason="dnsmasq is not installed "
                                                    "(apt: dnsmasq-base)")
REPO = Path(__file__).resolve().parents[2]
# The root key of DNS: a resolver holding it validates every answer, so an unsigned zone
# behind it fails validation and the resolver answers SERVFAIL.
ROOT_TRUST_ANCHOR = ".,20326,8,2,E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D"

RECORDS = [
    # Priority 0 first; weights 3:1 within it; priority 7 only after both.
    "--srv-host=_cmux._tcp.honey.test,hive-a.test,6001,0,30",
    "--srv-host=_cmux._tcp.honey.test,hive-b.test,6002,0,10",
    "--srv-host=_cmux._tcp.honey.test,backup.test,6003,7,50",
    # A target of "." says: no cmux service at this name.
    "--srv-host=_cmux._tcp.dot.test",
    # The first target refuses connections; the client goes on to the next one.
    "--srv-host=_cmux._tcp.bee.test,bee.test,6009,0,0",
    "--srv-host=_cmux._tcp.bee.test,bee.test,6001,1,0",
    "--srv-host=_cmux._tcp.wasp.test,wasp.test,6001,0,0",
    "--host-record=honey.test,127.0.0.1", "--host-record=bee.test,127.0.0.1",
    "--host-record=wasp.test,127.0.0.1", "--host-record=plain.test,127.0.0.1",
    "--host-record=dot.test,127.0.0.1", "--host-record=slow.test,127.0.0.1",
    "--host-record=hive-a.test,127.0.0.1", "--host-record=hive-b.test,127.0.0.1",
    "--host-record=backup.test,127.0.0.1",
]


def free_udp_port() -> int:
    """A loopback port free for UDP and for TCP: dnsmasq listens on both."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class Dnsmasq:
    """dnsmasq in the foreground, logging every query; stopped by close()."""

    def __init__(self, *args: str, port: int, netns: str | None = None):
        self.port = port
        self.log_file = tempfile.NamedTemporaryFile(prefix="dnsmasq-", suffix=".log")
        command = [DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                   "--no-hosts", "--listen-address=127.0.0.1", "--bind-interfaces",
                   f"--port={port}", "--pid-file=", "--log-queries", "--log-facility=-",
                   f"--user={os.environ.get('USER') or 'root'}", *args]
        if netns is not None:
            command = ["ip", "netns", "exec", netns, *command]
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self.log_file,
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: "started, version" in self.log() or self.proc.poll() is not None,
                 timeout=15, message="dnsmasq to start")
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return Path(self.log_file.name).read_text(errors="replace")

    def close(self) -> None:
        stop_process(self.proc)
        self.log_file.close()


@pytest.fixture(scope="module")
def silent_upstream():
    """A UDP port that reads queries and never answers: an upstream that has gone away."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture(scope="module")
def zone(silent_upstream):
    server = Dnsmasq("--local=/test/",
                     f"--server=/_cmux._tcp.slow.test/127.0.0.1#{silent_upstream}", *RECORDS,
                     port=free_udp_port())
    yield server
    server.close()


@pytest.fixture(scope="module")
def validating(zone):
    server = Dnsmasq("--dnssec", f"--trust-anchor={ROOT_TRUST_ANCHOR}",
                     "--dnssec-check-unsigned", f"--server=127.0.0.1#{zone.port}",
                     port=free_udp_port())
    yield server
    server.close()


def lookup(name: str, server: Dnsmasq, **kwargs) -> list[tuple[str, int]]:
    return asyncio.run(srv.lookup(name, nameservers=[("127.0.0.1", server.port)], **kwargs))


def test_priority_then_weight(zone):
    rng = random.Random(15)
    firsts = {"hive-a.test": 0, "hive-b.test": 0}
    for _ in range(200):
        order = lookup("honey.test", zone, rng=rng)
        assert sorted(order[:2]) == [("hive-a.test", 6001), ("hive-b.test", 6002)]
        assert order[2] == ("backup.test", 6003)
        firsts[order[0][0]] += 1
    # Weights 30:10, so hive-a comes first about three times in four.
    assert 120 < firsts["hive-a.test"] < 180, firsts


def test_no_such_name_means_no_records(zone):
    assert lookup("nowhere.test", zone) == []
    assert "_cmux._tcp.nowhere.test is NXDOMAIN" in zone.log()


def test_a_name_without_srv_records_means_no_records(zone):
    assert lookup("plain.test", zone) == []


def test_a_dot_target_means_no_records(zone):
    assert lookup("dot.test", zone) == []
    assert "query[SRV] _cmux._tcp.dot.test" in zone.log()


def test_servfail_means_no_records(validating):
    assert lookup("honey.test", validating) == []
    wait_for(lambda: "validation _cmux._tcp.honey.test is" in validating.log(), timeout=5,
             message="the resolver to fail validation")


def test_no_answer_within_the_deadline_means_no_records(zone):
    """The generous bound is about hanging, not speed: without the deadline this takes
    dnspython's default lifetime of 5 s."""
    started = time.monotonic()
    assert lookup("slow.test", zone) == []
    assert time.monotonic() - started < 3
    assert "forwarded _cmux._tcp.slow.test" in zone.log()


def test_names_dns_cannot_carry_mean_no_records(zone):
    for name in ("a..b", "x" * 300, "-." * 70):
        assert lookup(name, zone) == []


def test_no_nameserver_answering_at_all_means_no_records():
    """A nameserver address where nothing listens (refused at once on loopback)."""
    assert asyncio.run(srv.lookup("honey.test",
                                  nameservers=[("127.0.0.1", free_udp_port())])) == []


# End to end, in a network namespace with its own resolv.conf.

PROBE = ("import sys; from cmuxd.client import Client\n"
         "with Client(sys.argv[1]) as client:\n"
         "    assert client.rpc('ping') == {'pong': True}\n"
         "    print(client.address)\n")


class SrvNamespace:
    """A namespace with dnsmasq on 127.0.0.1:53 serving RECORDS, named by the namespace's
    resolv.conf, and a daemon listening on 127.0.0.1:6001, :6002 and :5555 (the default port
    is free there)."""

    def __init__(self):
        self.name = f"cmuxd-srv-{os.getpid()}"
        self.etc = Path("/etc/netns") / self.name
        ip("netns", "add", self.name)
        self.dns = self.daemon = None
        try:
            ip("-n", self.name, "link", "set", "lo", "up")
            self.etc.mkdir(parents=True)
            (self.etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1\n")
            self.dns = Dnsmasq("--local=/test/", "--server=/_cmux._tcp.slow.test/127.0.0.1#9",
                               *RECORDS, port=53, netns=self.name)
            self.dir = Path(tempfile.mkdtemp(prefix="cmuxd-test-"))
            self.token_file = self.dir / "relay-token"
            self.token = write_token_file(self.token_file)
            self.log_file = open(self.dir / "daemon.log", "w+b")
            self.env = {k: v for k, v in os.environ.items()
                        if k not in ("CMUX_RELAY_TOKEN", "CMUX_RELAY_ID", "CMUX_FLEET")}
            self.env.update(HOME=str(self.dir), CMUX_FLEET=str(self.dir / "cmux.json"))
            self.daemon = subprocess.Popen(
                self.exec(daemon_command(
                    "serve", "--workers", "1", "--token-file", str(self.token_file),
                    "--relay-id", RELAY_ID, "--state-dir", str(self.dir / "state"),
                    "--tcp", "127.0.0.1:6001", "--tcp", "127.0.0.1:6002",
                    "--tcp", "127.0.0.1:5555")),
                stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=self.log_file,
                env=self.env)
            wait_for(lambda: (self.dir / "state" / "control.sock").exists()
                     or self.daemon.poll() is not None, timeout=20, message="the daemon")
            assert self.daemon.poll() is None, (self.dir / "daemon.log").read_text()
        except BaseException:
            self.close()
            raise

    def exec(self, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def dial(self, target: str, **env: str) -> subprocess.CompletedProcess:
        """Connect, ping and print the address dialed, from a process of the namespace."""
        return subprocess.run(
            self.exec([sys.executable, "-c", PROBE, target]), capture_output=True, text=True,
            timeout=60, env=dict(self.env, CMUX_RELAY_ID=RELAY_ID, CMUX_RELAY_TOKEN=self.token,
                                 **env))

    def close(self) -> None:
        if self.daemon is not None:
            stop_process(self.daemon)
            self.log_file.close()
            shutil.rmtree(self.dir, ignore_errors=True)
        if self.dns is not None:
            self.dns.close()
        shutil.rmtree(self.etc, ignore_errors=True)
        ip("netns", "del", self.name, check=False)


@pytest.fixture(scope="module")
def namespace():
    reason = netns_permitted(f"cmuxd-srv-probe-{os.getpid()}")
    if reason:
        pytest.skip(reason)
    ns = SrvNamespace()
    yield ns
    ns.close()


def dialed(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_client_dials_the_srv_target_of_a_name_given_without_a_port(namespace):
    assert dialed(namespace.dial("wasp.test")) == "cmux://wasp.test:6001"
    assert dialed(namespace.dial("cmux://wasp.test")) == "cmux://wasp.test:6001"
    # The priority-0 targets answer, so the priority-7 one is never dialed.
    assert dialed(namespace.dial("honey.test")) in ("cmux://hive-a.test:6001",
                                                    "cmux://hive-b.test:6002")


def test_client_goes_on_to_the_next_target_when_one_refuses(namespace):
    assert dialed(namespace.dial("bee.test")) == "cmux://bee.test:6001"


@pytest.mark.parametrize("name", ["plain.test", "dot.test", "slow.test"])
def test_client_falls_back_to_5555_without_usable_records(namespace, name):
    """No SRV records (NXDOMAIN), a "." target, no answer from upstream in time."""
    assert dialed(namespace.dial(name)) == f"cmux://{name}:5555"


def test_an_explicit_port_and_ip_literals_are_never_looked_up(namespace):
    for target, expected in (("127.0.0.1", "cmux://127.0.0.1:5555"),
                             ("cmux://127.0.0.1", "cmux://127.0.0.1:5555"),
                             ("wasp.test:5555", "cmux://wasp.test:5555")):
        assert dialed(namespace.dial(target)) == expected
    log = namespace.dns.log()
    assert "_cmux._tcp.127.0.0.1" not in log
    assert "query[SRV] _cmux._tcp.wasp.test" in log  # asked by the earlier tests only
    before = log.count("query[SRV] _cmux._tcp.wasp.test")
    dialed(namespace.dial("wasp.test:6001"))
    assert namespace.dns.log().count("query[SRV] _cmux._tcp.wasp.test") == before


def test_cmux_json_is_read_before_dns(namespace):
    """A name in cmux.json is its entry's URI; DNS is not asked for its SRV records."""
    fleet = {"version": 1, "tailnet": "test", "hosts": [
        {"name": "hive", "dns_name": "wasp.test", "tailnet_ips": [],
         "uri": "cmux://wasp.test:5555", "relay_id": RELAY_ID,
         "credentials": {"token_file": str(namespace.token_file)}, "tags": [], "os": "linux"}]}
    path = namespace.dir / "fleet.json"
    path.write_text(json.dumps(fleet))
    assert dialed(namespace.dial("hive", CMUX_FLEET=str(path))) == "cmux://wasp.test:5555"
    assert "_cmux._tcp.hive" not in namespace.dns.log()


def test_the_cli_pings_through_the_srv_target(namespace):
    result = subprocess.run(
        namespace.exec(daemon_command("ping", "wasp.test", "--count", "1")),
        capture_output=True, text=True, timeout=60,
        env=dict(namespace.env, CMUX_RELAY_ID=RELAY_ID, CMUX_RELAY_TOKEN=namespace.token))
    assert result.returncode == 0, result.stderr
    assert "1 received" in result.stdout
    assert namespace.token not in result.stdout + result.stderr
