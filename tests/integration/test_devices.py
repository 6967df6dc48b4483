"""Device keys end to end: real daemons, real CLI processes, each device with its own HOME."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import tempfile
import time
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cmuxd.auth import device_transcript, fingerprint
from helpers import daemon_command, wait_for
from listening import RELAY_ID, ListeningDaemon, read_line, refused


class Device:
    """A client machine: its own HOME, so its own device key and pins."""

    def __init__(self, name: str):
        self.name = name
        self.home = Path(tempfile.mkdtemp(prefix=f"cmuxd-device-{name}-"))

    def run(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CMUX_")}
        env.update(HOME=str(self.home), XDG_CONFIG_HOME=str(self.home / ".config"))
        return subprocess.run(daemon_command(*args), input=input, capture_output=True,
                              env=env, timeout=30)

    def key(self):
        from cmuxd.devices import _load_private_key
        return _load_private_key(self.home / ".config/cmuxd/device-key", "device key")


def host_cli(d: ListeningDaemon, *args: str, input: bytes | None = None):
    env = dict(d.env, XDG_CONFIG_HOME=str(d.dir / ".config"))
    return subprocess.run(daemon_command(*args, "--state-dir", str(d.state_dir))
                          if args[1] in ("add", "list", "revoke") else daemon_command(*args),
                          input=input, capture_output=True, env=env, timeout=30)


def enroll(d: ListeningDaemon, device: Device) -> str:
    """`device key` → `device add` → `device trust`; the host line."""
    line = device.run("device", "key", "--name", device.name)
    assert line.returncode == 0, line.stderr
    added = host_cli(d, "device", "add", device.name, input=line.stdout)
    assert added.returncode == 0, added.stderr
    trusted = device.run("device", "trust", f"127.0.0.1:{d.port}", input=added.stdout)
    assert trusted.returncode == 0, trusted.stderr
    return added.stdout.decode().strip()


@pytest.fixture
def daemon():
    d = ListeningDaemon()
    d.env["XDG_CONFIG_HOME"] = str(d.dir / ".config")
    d.wait_ready()
    yield d
    d.close()


def test_key_add_trust_then_ping_with_no_other_flag(daemon):
    laptop = Device("laptop")
    host_line = enroll(daemon, laptop)
    assert host_line.startswith("cmuxd-host-ed25519 ") and host_line.endswith(RELAY_ID)
    proc = laptop.run("ping", f"127.0.0.1:{daemon.port}", "--count", "1")
    assert proc.returncode == 0, proc.stderr
    assert b"1 received" in proc.stdout
    # The private key never left the device; nothing secret was printed.
    seed = (laptop.home / ".config/cmuxd/device-key").read_text().strip()
    assert os.stat(laptop.home / ".config/cmuxd/device-key").st_mode & 0o777 == 0o600
    assert seed not in host_line and seed not in proc.stdout.decode() + daemon.log()


def device_handshake(d: ListeningDaemon, key, claim: str | None = None,
                     replay: tuple | None = None):
    """A raw device handshake written from the README: sign the transcript with `key`,
    naming the key `claim` (default: its own). `replay` = (client_nonce, signature) sends
    those from an earlier handshake instead. (socket, reply, transcript)."""
    sock = d.tcp_connect()
    challenge = json.loads(read_line(sock))
    host_fp = challenge["ext_device_keys"]
    claim = claim or fingerprint(key.public_key())
    client_nonce = secrets.token_hex(32)
    transcript = device_transcript(RELAY_ID, challenge["nonce"], client_nonce, host_fp, claim)
    sig = base64.b64encode(key.sign(transcript)).decode()
    if replay is not None:
        client_nonce, sig = replay
    sock.sendall(orjson.dumps({"relay_id": RELAY_ID, "client_nonce": client_nonce,
                               "ext_device": claim, "ext_device_sig": sig}) + b"\n")
    return sock, json.loads(read_line(sock) or b"{}"), (client_nonce, sig)


def attach(stream, session: str):
    r = stream.call("pty.attach", {"session_id": session, "attachment_id": session,
                                   "client_attachment_token": "t", "cols": 80, "rows": 24,
                                   "command": "cat"})
    assert r["ok"], r


def test_revoke_closes_that_device_only_and_sessions_go_on(daemon):
    from helpers import FrameStream

    a, b = Device("phone"), Device("tablet")
    enroll(daemon, a)
    enroll(daemon, b)
    sock_a, reply, _ = device_handshake(daemon, a.key())
    assert reply["ok"] is True and "ext_host_sig" in reply
    sock_b, reply, _ = device_handshake(daemon, b.key())
    assert reply["ok"] is True
    stream_a, stream_b = FrameStream(sock_a), FrameStream(sock_b)
    attach(stream_a, "sa")
    attach(stream_b, "sb")
    assert stream_a.call("ext.status")["result"]["caller"] == "device phone"
    token_stream = daemon.authed()
    assert token_stream.call("ext.status")["result"]["caller"] == "shared token"
    wait_for(lambda: daemon.status()["device_connections"] == {"phone": 1, "tablet": 1},
             message="connections per device in status")
    table = daemon.cli("status", "--state-dir", str(daemon.state_dir)).stdout.decode()
    assert [line.split() for line in table.splitlines()
            if line.startswith(("phone ", "tablet "))] == [["phone", "1"], ["tablet", "1"]]

    revoked = host_cli(daemon, "device", "revoke", "phone")
    assert revoked.returncode == 0, revoked.stderr
    t0 = time.monotonic()
    sock_a.settimeout(5)
    while sock_a.recv(65536):
        pass  # events until the daemon closes it
    assert time.monotonic() - t0 < 1.0
    again, reply, _ = device_handshake(daemon, a.key())
    assert reply == {"ok": False}
    assert refused(again) == b""
    # The other device, the shared token and both sessions go on.
    assert stream_b.call("ping")["ok"] is True
    assert token_stream.call("ping")["ok"] is True
    sessions = {s["session_id"] for s in token_stream.call("pty.list")["result"]["sessions"]}
    assert sessions == {"sa", "sb"}
    listed = json.loads(host_cli(daemon, "device", "list", "--json").stdout)
    assert [(r["name"], r["connections"]) for r in listed] == [("tablet", 1)]
    assert "device phone revoked" in daemon.log()
    assert "device tablet connected from 127.0.0.1" in daemon.log()


def test_a_key_naming_another_device_and_a_replay_are_refused(daemon):
    a, b = Device("alpha"), Device("beta")
    enroll(daemon, a)
    enroll(daemon, b)
    t0 = time.monotonic()
    sock, reply, _ = device_handshake(daemon, a.key(), claim=fingerprint(b.key().public_key()))
    assert reply == {"ok": False} and time.monotonic() - t0 >= 0.05
    sock.close()
    sock, reply, used = device_handshake(daemon, a.key())
    assert reply["ok"] is True
    sock.close()
    sock, reply, _ = device_handshake(daemon, a.key(), replay=used)
    assert reply == {"ok": False}
    sock.close()
    stranger = Ed25519PrivateKey.generate()
    sock, reply, _ = device_handshake(daemon, stranger)
    assert reply == {"ok": False}
    sock.close()
    assert daemon.authed().call("ping")["ok"] is True
    beta_fp = fingerprint(b.key().public_key())
    alpha_fp = fingerprint(a.key().public_key())
    wait_for(lambda: "failed device keys: " in daemon.log(), timeout=20, interval=0.5,
             message="the aggregated refusal line")
    line = next(l for l in daemon.log().splitlines() if "failed device keys: " in l)
    # The claimed key (beta) and the replayed one (alpha): one line, by fingerprint.
    assert f"{beta_fp}: 1" in line and f"{alpha_fp}: 1" in line
    assert fingerprint(stranger.public_key()) not in daemon.log()


def test_a_wrong_host_key_pin_makes_the_device_refuse_the_daemon(daemon):
    laptop = Device("laptop")
    enroll(daemon, laptop)
    other = Ed25519PrivateKey.generate()
    from cmuxd.devices import HOST_LINE_TYPE, public_line
    forged = public_line(HOST_LINE_TYPE, other.public_key(), RELAY_ID)
    assert laptop.run("device", "trust", f"127.0.0.1:{daemon.port}",
                      input=forged.encode()).returncode == 0
    proc = laptop.run("ping", f"127.0.0.1:{daemon.port}", "--count", "1")
    assert proc.returncode == 4
    assert "pinned for this host with `device trust`" in proc.stderr.decode()


def test_devices_only_refuses_the_shared_token_over_tcp():
    d = ListeningDaemon("--devices-only")
    try:
        d.wait_ready()
        laptop = Device("laptop")
        enroll(d, laptop)
        sock = d.tcp_connect()
        from listening import mac_for
        nonce = json.loads(read_line(sock))["nonce"]
        sock.sendall(orjson.dumps({"mac": mac_for(d.token, RELAY_ID, nonce),
                                   "relay_id": RELAY_ID}) + b"\n")
        assert json.loads(read_line(sock)) == {"ok": False}
        sock.close()
        assert laptop.run("ping", f"127.0.0.1:{d.port}", "--count", "1").returncode == 0
        assert d.unix().call("ping")["ok"] is True  # the peer uid check, not the token
    finally:
        d.close()


@pytest.mark.parametrize("line, message", [
    ("ssh-ed25519 AAAA laptop", "not a device public line"),
    ("cmuxd-device-ed25519 !!!! laptop", "not a valid Ed25519 public key"),
    ("cmuxd-device-ed25519 " + base64.b64encode(b"x" * 32).decode() + " bad/name",
     "1 to 64 letters"),
    ("", "not a device public line"),
])
def test_a_malformed_public_line_is_refused(daemon, line, message):
    proc = host_cli(daemon, "device", "add", "laptop", input=line.encode() + b"\n")
    assert proc.returncode == 1
    assert message in proc.stderr.decode()
    assert json.loads(host_cli(daemon, "device", "list", "--json").stdout) == []


def test_a_duplicate_name_and_a_bad_name_are_refused(daemon):
    a, b = Device("one"), Device("two")
    enroll(daemon, a)
    line = b.run("device", "key").stdout
    proc = host_cli(daemon, "device", "add", "one", input=line)
    assert proc.returncode == 1 and "already authorized" in proc.stderr.decode()
    proc = host_cli(daemon, "device", "add", "../etc", input=line)
    assert proc.returncode == 1 and "1 to 64 letters" in proc.stderr.decode()
    assert [r["name"] for r in json.loads(host_cli(daemon, "device", "list", "--json").stdout)] \
        == ["one"]


def test_loose_modes_and_owners_are_refused(daemon):
    laptop = Device("laptop")
    enroll(daemon, laptop)
    authorized = daemon.dir / ".config/cmuxd/authorized-devices"
    authorized.chmod(0o666)
    proc = host_cli(daemon, "device", "list")
    assert proc.returncode == 1 and "chmod 600" in proc.stderr.decode()
    authorized.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(authorized, 65534, 65534)
        proc = host_cli(daemon, "device", "list")
        assert proc.returncode == 1 and "belongs to uid 65534" in proc.stderr.decode()
        os.chown(authorized, 0, 0)
    key = laptop.home / ".config/cmuxd/device-key"
    key.chmod(0o644)
    proc = laptop.run("ping", f"127.0.0.1:{daemon.port}", "--count", "1")
    assert proc.returncode == 4 and "chmod 600" in proc.stderr.decode()
    assert key.read_text().strip() not in proc.stderr.decode()


def test_cmux_json_points_a_host_at_device_key_files_and_holds_no_secret(daemon):
    laptop = Device("laptop")
    host_line = enroll(daemon, laptop)
    keys = laptop.home / "elsewhere"
    keys.mkdir(mode=0o700)
    (laptop.home / ".config/cmuxd/device-key").rename(keys / "device-key")
    # The pin names the host as cmux.json does.
    pins = (laptop.home / ".config/cmuxd/known-hosts")
    pins.write_text(pins.read_text().replace(f"127.0.0.1:{daemon.port}", "honey"))
    pins.rename(keys / "known-hosts")
    fleet = laptop.home / "cmux.json"
    entry = {"name": "honey", "uri": f"cmux://127.0.0.1:{daemon.port}", "relay_id": RELAY_ID,
             "credentials": {"token_file": None, "device_key": str(keys / "device-key"),
                             "known_hosts": str(keys / "known-hosts")}}
    fleet.write_text(json.dumps({"version": 1, "hosts": [entry]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMUX_")}
    env.update(HOME=str(laptop.home), XDG_CONFIG_HOME=str(laptop.home / ".config"),
               CMUX_FLEET=str(fleet))
    proc = subprocess.run(daemon_command("ping", "honey", "--count", "1"), capture_output=True,
                          env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    seed = (keys / "device-key").read_text().strip()
    assert seed not in fleet.read_text() and host_line.split()[1] in (keys / "known-hosts").read_text()
    # Half of the pair is a mistake, said in one sentence; nothing is dialled.
    entry["credentials"].pop("known_hosts")
    fleet.write_text(json.dumps({"version": 1, "hosts": [entry]}))
    proc = subprocess.run(daemon_command("ping", "honey", "--count", "1"), capture_output=True,
                          env=env, timeout=30)
    assert proc.returncode != 0 and b"device_key without known_hosts" in proc.stderr
