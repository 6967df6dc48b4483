"""A fleet of three hosts, each a network namespace with a tailnet-like interface, checked from
the root namespace, and an outsider that --allow-from turns away.

    root namespace: bridge cxbr<tag>  100.64.0.1/10, fd7a:115c:a1e0::1/48
      ├── veth ── cmuxd-fleet-<tag>-a: tailscale0  100.64.1.2/10, fd7a:115c:a1e0::1:2/48
      ├── veth ── cmuxd-fleet-<tag>-b: tailscale0  100.64.2.2/10, fd7a:115c:a1e0::2:2/48
      ├── veth ── cmuxd-fleet-<tag>-c: tailscale0  100.64.3.2/10, fd7a:115c:a1e0::3:2/48
      └── veth ── cmuxd-fleet-<tag>-out: eth0     192.168.77.2/24 (not a tailnet address)

Only these addresses (and loopback) are ever dialled. Everything is created by the fixture
and removed by it, whatever happens in between; without permission to create a network
namespace the module is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from cmuxd.status import query_status
from helpers import daemon_command, stop_process, wait_for, write_token_file
from netns import ip, netns_permitted

PORT = 5555
TAG = str(os.getpid() % 100000)
BRIDGE = f"cxbr{TAG}"
ROOT_V4, ROOT_V6 = "100.64.0.1/10", "fd7a:115c:a1e0::1/48"
HOSTS = {  # name -> (IPv4, IPv6) on tailscale0
    "fleet-a": ("100.64.1.2", "fd7a:115c:a1e0::1:2"),
    "fleet-b": ("100.64.2.2", "fd7a:115c:a1e0::2:2"),
    "fleet-c": ("100.64.3.2", "fd7a:115c:a1e0::3:2"),
}
OUTSIDER = ("out", "192.168.77.2")


def netns_name(short: str) -> str:
    return f"cmuxd-fleet-{TAG}-{short}"


class Network:
    """The bridge, the namespaces and their veths; `remove` undoes whatever was made."""

    def __init__(self):
        self.namespaces: list[str] = []
        self.links: list[str] = []
        self.bridge = False

    def build(self) -> None:
        ip("link", "add", BRIDGE, "type", "bridge")
        self.bridge = True
        ip("addr", "add", ROOT_V4, "dev", BRIDGE)
        ip("-6", "addr", "add", ROOT_V6, "dev", BRIDGE, "nodad")
        ip("link", "set", BRIDGE, "up")
        for i, (name, (v4, v6)) in enumerate(HOSTS.items()):
            ns = self.namespace(name.removeprefix("fleet-"), f"cxv{TAG}{i}", "tailscale0")
            ip("-n", ns, "addr", "add", f"{v4}/10", "dev", "tailscale0")
            ip("-n", ns, "-6", "addr", "add", f"{v6}/48", "dev", "tailscale0", "nodad")
            ip("-n", ns, "link", "set", "tailscale0", "up")
            # The outsider's replies come back over the same link.
            ip("-n", ns, "route", "add", f"{OUTSIDER[1]}/32", "dev", "tailscale0")
        short, address = OUTSIDER
        ns = self.namespace(short, f"cxv{TAG}o", "eth0")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "route", "add", "100.64.0.0/10", "dev", "eth0")

    def namespace(self, short: str, outer: str, inner: str) -> str:
        ns = netns_name(short)
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        ip("link", "add", outer, "type", "veth", "peer", "name", f"{outer}p")
        self.links.append(outer)
        ip("link", "set", f"{outer}p", "netns", ns)
        ip("-n", ns, "link", "set", f"{outer}p", "name", inner)
        ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "set", outer, "master", BRIDGE, "up")
        return ns

    def remove(self) -> None:
        for ns in self.namespaces:
            # Whatever still runs in the namespace was started by this test (workers and PTY
            # hubs of a killed daemon, say).
            pids = ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            ip("netns", "del", ns, check=False)
        for link in self.links:
            ip("link", "del", link, check=False)  # gone with its peer's namespace, usually
        if self.bridge:
            ip("link", "del", BRIDGE, check=False)


class NamespaceDaemon:
    """`serve --tcp tailscale:5555 --allow-from tailnet` inside a namespace, with its own
    token file and state directory."""

    def __init__(self, name: str, ns: str, token_file: Path, base: Path):
        self.name = name
        self.ns = ns
        self.state_dir = base / f"state-{name}"
        self.log_path = base / f"{name}.log"
        self.log_file = open(self.log_path, "wb")
        env = dict(os.environ, HOME=str(base))
        env.pop("CMUX_RELAY_ID", None)
        env.pop("CMUX_RELAY_TOKEN", None)
        cmd = ["ip", "netns", "exec", ns, *daemon_command(
            "serve", "--tcp", f"tailscale:{PORT}", "--allow-from", "tailnet",
            "--token-file", str(token_file), "--relay-id", name,
            "--state-dir", str(self.state_dir), "--workers", "1")]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log_file,
                                     stderr=self.log_file, env=env)

    def status(self) -> dict:
        return query_status(self.state_dir / "control.sock")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n"
                                     f"{self.log()}")
            try:
                return all(w["alive"] for w in self.status()["workers"])
            except OSError:
                return False
        wait_for(ready, timeout=30, message=f"{self.name} to be ready")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(15)

    def close(self) -> None:
        stop_process(self.proc)
        self.log_file.close()


def tailscale_status(base_tag: str = "tag:cmuxd-fleet") -> dict:
    """What `tailscale status --json` would say on the root namespace's "host": itself
    untagged, the three daemons tagged, MagicDNS off (nothing here resolves tailnet names)."""
    def node(i: int, host: str, ips: list[str], tags: list[str] | None) -> dict:
        n = {"ID": f"nTEST{i}CNTRL", "PublicKey": f"nodekey:{i:064x}", "HostName": host,
             "DNSName": f"{host}.tailtest.ts.net.", "OS": "linux", "UserID": 1,
             "TailscaleIPs": ips, "Online": True}
        if tags:
            n["Tags"] = tags
        return n
    peers = {}
    for i, (name, (v4, v6)) in enumerate(HOSTS.items(), start=1):
        peer = node(i, name, [v4, v6], [base_tag])
        peers[peer["PublicKey"]] = peer
    return {"Version": "1.66.4", "BackendState": "Running",
            "Self": node(0, "root", ["100.64.0.1", "fd7a:115c:a1e0::1"], None),
            "MagicDNSSuffix": "tailtest.ts.net",
            "CurrentTailnet": {"Name": "test", "MagicDNSSuffix": "tailtest.ts.net",
                               "MagicDNSEnabled": False},
            "Peer": peers}


@pytest.fixture(scope="module")
def fleet():
    reason = netns_permitted(netns_name("probe"))
    if reason is not None:
        print(f"skipping the namespace fleet test: {reason}")
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="cmuxd-fleet-"))
    tokens = base / "tokens"
    tokens.mkdir(mode=0o700)
    network = Network()
    daemons: dict[str, NamespaceDaemon] = {}
    try:
        network.build()
        for name in HOSTS:
            token = tokens / name
            write_token_file(token)
            daemons[name] = NamespaceDaemon(name, netns_name(name.removeprefix("fleet-")),
                                            token, base)
        for daemon in daemons.values():
            daemon.wait_ready()
        status_file = base / "status.json"
        status_file.write_text(json.dumps(tailscale_status()))
        made = subprocess.run(daemon_command(
            "fleet", "config", "--from-tailscale", str(status_file), "--tag", "tag:cmuxd-fleet",
            "--token-dir", str(tokens)), capture_output=True, timeout=30)
        assert made.returncode == 0, made.stderr
        (base / "cmux.json").write_bytes(made.stdout)
        yield base, daemons
    finally:
        for daemon in daemons.values():
            daemon.close()
        network.remove()
        shutil.rmtree(base, ignore_errors=True)


def cli(base: Path, *args: str, netns: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HOME=str(base), CMUX_FLEET=str(base / "cmux.json"))
    env.pop("CMUX_RELAY_ID", None)
    env.pop("CMUX_RELAY_TOKEN", None)
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*prefix, *daemon_command(*args)], capture_output=True, env=env,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_each_daemon_listens_on_its_tailnet_addresses_only(fleet):
    base, daemons = fleet
    for name, (v4, v6) in HOSTS.items():
        listeners = {(l["kind"], l["address"]) for l in daemons[name].status()["listeners"]}
        assert listeners == {("tcp", f"{v4}:{PORT}"), ("tcp", f"[{v6}]:{PORT}")}
    cmux = json.loads((base / "cmux.json").read_text())
    assert [h["name"] for h in cmux["hosts"]] == list(HOSTS)  # the untagged Self is left out
    assert cmux["hosts"][0]["uri"] == f"cmux://{HOSTS['fleet-a'][0]}:{PORT}"


def test_fleet_status_from_the_root_namespace_then_one_host_down(fleet):
    base, daemons = fleet
    result = cli(base, "fleet", "status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert [(h["name"], h["state"]) for h in report["hosts"]] == \
        [(name, "up") for name in HOSTS]
    for host in report["hosts"]:
        assert host["address"] == f"{HOSTS[host['name']][0]}:{PORT}"
        assert host["workers"] == 1 and host["connections"] >= 1 and host["version"]

    # A host name from cmux.json, over IPv6 this time by the address itself.
    v6 = HOSTS["fleet-c"][1]
    ping6 = cli(base, "ping", f"[{v6}]:{PORT}", "-c", "1", "--relay-id", "fleet-c",
                "--token-file", str(base / "tokens" / "fleet-c"))
    assert ping6.returncode == 0, ping6.stderr
    assert cli(base, "ping", "fleet-b", "-c", "1").returncode == 0

    daemons["fleet-b"].kill()
    down = cli(base, "fleet", "status")
    assert down.returncode == 3, down.stdout + down.stderr
    rows = {line.split()[0]: line.split() for line in down.stdout.decode().splitlines()[1:4]}
    assert rows["fleet-a"][2] == "up" and rows["fleet-c"][2] == "up"
    assert rows["fleet-b"][2] == "down"
    assert down.stdout.decode().rstrip().endswith("3 hosts: 2 up, 1 not up")


def test_allow_from_tailnet_refuses_a_peer_outside_the_tailnet(fleet):
    base, daemons = fleet
    target = daemons["fleet-a"]
    before = target.status()["counters"].get("refused_not_allowed", 0)
    result = cli(base, "ping", f"{HOSTS['fleet-a'][0]}:{PORT}", "-c", "1",
                 "--relay-id", "fleet-a", "--token-file", str(base / "tokens" / "fleet-a"),
                 netns=netns_name(OUTSIDER[0]))
    assert result.returncode == 4, result.stdout + result.stderr
    assert b"closed the connection without a challenge" in result.stderr
    # It was the gate that refused it: the connection got there and was counted.
    wait_for(lambda: target.status()["counters"].get("refused_not_allowed", 0) == before + 1,
             message="the refusal to be counted")
    # A tailnet peer is still served by the same daemon.
    assert cli(base, "ping", "fleet-a", "-c", "1").returncode == 0
