"""cmux.json from recorded `tailscale status --json` documents, and cmux.json read back."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from cmuxd.client import ClientError, credentials_for, parse_address
from cmuxd.fleet import (
    Fleet,
    FleetError,
    fleet_from_tailscale,
    fleet_path,
    load_fleet,
    srv_records,
)
from helpers import daemon_command

FIXTURES = Path(__file__).parent.parent / "fixtures"


def status_doc(name: str) -> dict:
    return json.loads((FIXTURES / f"tailscale-status-{name}.json").read_text())


def cli(*args: str, input: bytes | None = None, env: dict | None = None):
    return subprocess.run(daemon_command(*args), input=input, capture_output=True, timeout=30,
                          env=env)


def test_tagged_nodes_online_or_not_with_self_when_tagged():
    fleet = fleet_from_tailscale(status_doc("fleet"), tags=["tag:cmuxd-fleet"])
    assert [h.name for h in fleet.hosts] == ["bee", "hive", "honey", "wasp", "worker",
                                              "worker-1"]
    assert fleet.tailnet == "tail4c2f1.ts.net"
    honey = fleet.find("honey")  # Self, tagged
    assert honey.dns_name == "honey.tail4c2f1.ts.net"
    assert honey.tailnet_ips == ("100.101.102.103", "fd7a:115c:a1e0::6b01:6667")
    assert honey.uri == "cmux://honey.tail4c2f1.ts.net:5555"
    assert honey.relay_id == "honey"
    assert honey.token_file == "~/.config/cmuxd/relay-token"
    assert honey.tags == ("tag:cmuxd-fleet", "tag:server")
    assert honey.os == "linux"
    # Offline now, still part of the fleet.
    assert fleet.find("wasp").uri == "cmux://wasp.tail4c2f1.ts.net:5555"
    # Two machines called "worker": MagicDNS told them apart, the relay id is each daemon's
    # own default (the host name), so both keep "worker".
    assert fleet.find("worker-1").relay_id == "worker"
    # Untagged (a laptop, a phone) and otherwise-tagged nodes stay out.
    for name in ("alices-macbook-pro", "alices-iphone", "build-01"):
        assert fleet.find(name) is None


def test_tag_without_prefix_and_several_tags():
    doc = status_doc("fleet")
    assert fleet_from_tailscale(doc, tags=["cmuxd-fleet"]).to_json() == \
        fleet_from_tailscale(doc, tags=["tag:cmuxd-fleet"]).to_json()
    names = [h.name for h in fleet_from_tailscale(doc, tags=["tag:ci"]).hosts]
    assert names == ["build-01", "worker-1"]


def test_no_tag_keeps_every_node():
    names = [h.name for h in fleet_from_tailscale(status_doc("fleet")).hosts]
    assert names == ["alices-iphone", "alices-macbook-pro", "bee", "build-01", "hive", "honey",
                     "wasp", "worker", "worker-1"]


def test_magicdns_off_dials_the_ipv4_address():
    fleet = fleet_from_tailscale(status_doc("no-magicdns"), tags=["tag:cmuxd-fleet"])
    assert [(h.name, h.uri, h.relay_id) for h in fleet.hosts] == [
        ("bee", "cmux://100.88.14.7:5555", "Bee"),  # HostName "Bee.lan": the short name
        ("honey", "cmux://100.101.102.103:5555", "honey"),
    ]
    assert fleet.find("bee").dns_name == "bee.tail9e07b.ts.net"


def test_logged_out_node_gives_no_host():
    assert fleet_from_tailscale(status_doc("needs-login")).hosts == []


def test_output_is_deterministic_whatever_the_peer_order():
    doc = status_doc("fleet")
    first = fleet_from_tailscale(doc, tags=["tag:cmuxd-fleet"]).dumps()
    peers = list(doc["Peer"].items())
    for seed in range(5):
        random.Random(seed).shuffle(peers)
        shuffled = dict(doc, Peer=dict(peers))
        assert fleet_from_tailscale(shuffled, tags=["tag:cmuxd-fleet"]).dumps() == first
    data = json.loads(first)
    assert list(data) == ["version", "tailnet", "hosts"] and data["version"] == 1
    assert list(data["hosts"][0]) == ["name", "dns_name", "tailnet_ips", "uri", "relay_id",
                                      "credentials", "tags", "os"]
    assert first.endswith("}\n")


def test_port_token_dir_and_relay_id(tmp_path):
    fleet = fleet_from_tailscale(status_doc("fleet"), tags=["cmuxd-fleet"], port=7777,
                                 token_dir="~/.config/cmuxd/tokens", relay_id="fleet")
    bee = fleet.find("bee")
    assert bee.uri == "cmux://bee.tail4c2f1.ts.net:7777"
    assert bee.token_file == "~/.config/cmuxd/tokens/bee"
    assert {h.relay_id for h in fleet.hosts} == {"fleet"}
    # A relative path would mean something else in every directory a client runs from.
    os.chdir(tmp_path)
    fleet = fleet_from_tailscale(status_doc("fleet"), tags=["cmuxd-fleet"], token_dir="tokens")
    assert fleet.find("bee").token_file == str(tmp_path / "tokens" / "bee")


def test_srv_records_for_a_zone_of_ones_own():
    fleet = fleet_from_tailscale(status_doc("fleet"), tags=["tag:cmuxd-fleet"])
    lines = srv_records(fleet, "example.org.").splitlines()
    assert lines[0].startswith(";")
    assert lines[1] == "_cmux._tcp.bee.example.org. 300 IN SRV 0 0 5555 bee.tail4c2f1.ts.net."
    assert len(lines) == 1 + len(fleet.hosts)
    with pytest.raises(FleetError):
        srv_records(fleet, " ")


def test_written_file_reads_back(tmp_path):
    fleet = fleet_from_tailscale(status_doc("fleet"), tags=["tag:cmuxd-fleet"])
    path = tmp_path / "cmux.json"
    path.write_text(fleet.dumps())
    back = load_fleet(path)
    assert [h.name for h in back.hosts] == [h.name for h in fleet.hosts]
    honey = back.find("honey.tail4c2f1.ts.net.")  # MagicDNS name, trailing dot and all
    assert honey.name == "honey"
    # `~` is the reader's home.
    assert honey.token_file == os.path.expanduser("~/.config/cmuxd/relay-token")
    assert Fleet(back.hosts, back.tailnet).dumps().replace(os.path.expanduser("~"), "~") \
        == fleet.dumps()


@pytest.mark.parametrize("text,fragment", [
    ("{nope", "not valid JSON"),
    ('{"version": 2, "hosts": []}', "version 2"),
    ('{"version": 1}', "no hosts list"),
    ('{"version": 1, "hosts": [{"name": "x"}]}', "host #1"),
])
def test_a_broken_fleet_file_says_how_to_fix_it(tmp_path, text, fragment):
    path = tmp_path / "cmux.json"
    path.write_text(text)
    with pytest.raises(FleetError) as info:
        load_fleet(path)
    assert fragment in str(info.value) and "fleet config" in str(info.value)


def test_fleet_path_lookup_order(tmp_path):
    assert fleet_path({"CMUX_FLEET": "/x/f.json", "HOME": "/h"}) == Path("/x/f.json")
    assert fleet_path({"XDG_CONFIG_HOME": "/c", "HOME": "/h"}) == Path("/c/cmuxd/cmux.json")
    assert fleet_path({"XDG_CONFIG_HOME": "rel", "HOME": "/h"}) == \
        Path("/h/.config/cmuxd/cmux.json")


def test_client_addresses_take_names_and_credentials_from_cmux_json(tmp_path, monkeypatch):
    token = tmp_path / "bee"  # --token-dir: DIR/<name>
    token.write_text("ab" * 32 + "\n")
    token.chmod(0o600)
    fleet = fleet_from_tailscale(status_doc("fleet"), tags=["tag:cmuxd-fleet"],
                                 token_dir=str(tmp_path))
    (tmp_path / "cmux.json").write_text(fleet.dumps())
    monkeypatch.setenv("CMUX_FLEET", str(tmp_path / "cmux.json"))
    monkeypatch.delenv("CMUX_RELAY_ID", raising=False)
    monkeypatch.delenv("CMUX_RELAY_TOKEN", raising=False)
    address = parse_address("bee")
    assert (address.host, address.port, address.name) == ("bee.tail4c2f1.ts.net", 5555, "bee")
    assert parse_address("cmux://bee") == address
    creds = credentials_for(address)
    assert creds.relay_id == "bee" and creds.token == bytes.fromhex("ab" * 32)
    assert "cmux.json" in creds.source and "ab" * 32 not in creds.source
    # Flags still win.
    assert credentials_for(address, relay_id="other").relay_id == "other"
    # An explicit port means the address itself, not the fleet entry.
    assert parse_address("bee:5555").name == ""
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    monkeypatch.setenv("CMUX_FLEET", str(broken))
    with pytest.raises(ClientError) as info:
        parse_address("bee")
    assert info.value.exit_code == 2 and "not valid JSON" in str(info.value)


def test_fleet_config_from_a_file_and_from_stdin_agree(tmp_path):
    path = FIXTURES / "tailscale-status-fleet.json"
    from_file = cli("fleet", "config", "--from-tailscale", str(path), "--tag", "tag:cmuxd-fleet")
    assert from_file.returncode == 0, from_file.stderr
    from_stdin = cli("fleet", "config", "--from-tailscale", "-", "--tag", "tag:cmuxd-fleet",
                     input=path.read_bytes())
    assert from_stdin.stdout == from_file.stdout
    assert json.loads(from_file.stdout)["hosts"][0]["name"] == "bee"
    srv = cli("fleet", "config", "--from-tailscale", str(path), "--tag", "cmuxd-fleet",
              "--srv", "example.org")
    assert srv.returncode == 0 and b"_cmux._tcp.honey.example.org. 300 IN SRV" in srv.stdout


def test_fleet_config_errors_are_sentences(tmp_path):
    path = FIXTURES / "tailscale-status-fleet.json"
    none = cli("fleet", "config", "--from-tailscale", str(path), "--tag", "tag:nothing")
    assert none.returncode != 0 and b"no node of the tailnet carries tag:nothing" in none.stderr
    junk = cli("fleet", "config", "--from-tailscale", "-", input=b"hello")
    assert junk.returncode != 0 and b"tailscale status --json" in junk.stderr
    both = cli("fleet", "config", "--from-tailscale", str(path), "--token-file", "a",
               "--token-dir", "b")
    assert both.returncode != 0 and b"choose one" in both.stderr
    if shutil.which("tailscale") is None:
        env = dict(os.environ, PATH=str(tmp_path))
        missing = cli("fleet", "config", env=env)
        assert missing.returncode != 0
        assert b"tailscale CLI is not installed" in missing.stderr
        assert b"--from-tailscale" in missing.stderr
