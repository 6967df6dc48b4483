"""Idle pre-auth floods: the handshake table makes room by dropping the handshake idle
longest of the source holding the most, so good clients keep getting in, and our client
tells a busy daemon from refused credentials (`ext_busy`, spec §6.8)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest

from helpers import wait_for
from cmuxd.client import BUSY_ATTEMPTS
from cmuxd.supervisor.gate import EXPIRE_BATCH
from listening import RELAY_ID, ListeningDaemon, free_port, mac_for, read_line, refused
from netns import DelayedNamespace, PeerNamespace, namespace_or_skip

TESTS = Path(__file__).resolve().parent.parent
BUSY = b'{"ok":false,"ext_busy":true}\n'


@pytest.fixture
def peer():
    tag = str(os.getpid() % 100000 + 1)
    with namespace_or_skip(f"cmuxd-peer-{tag}-probe", lambda: PeerNamespace(tag, subnet=214)) as ns:
        yield ns


@pytest.fixture
def far():
    """A namespace 200 ms of round trip away (100 ms each way for every packet)."""
    tag = str(os.getpid() % 100000 + 2)
    with namespace_or_skip(f"cmuxd-far-{tag}-probe",
                           lambda: DelayedNamespace(tag, 100, subnet=221)) as ns:
        yield ns


def connect_from(peer: PeerNamespace, port: int) -> socket.socket:
    sock = peer.socket()
    sock.settimeout(10)
    sock.connect((peer.root_address, port))
    sock.settimeout(None)
    return sock


def auth_line(d: ListeningDaemon, nonce: str, **extra) -> bytes:
    return orjson.dumps({"mac": mac_for(d.token, RELAY_ID, nonce), "relay_id": RELAY_ID,
                         **extra}) + b"\n"


def ping_ok(stream) -> None:
    assert stream.call("ping", id=1) == {"id": 1, "ok": True, "result": {"pong": True}}
    stream.close()


def test_a_full_table_drops_the_idle_longest_and_says_busy_only_to_our_clients(peer):
    port = free_port()
    d = ListeningDaemon("--max-handshakes", "2", "--backoff-failures", "2",
                        tcp=[f"{peer.root_address}:{port}"])
    try:
        d.wait_ready()
        first = connect_from(peer, port)
        first_nonce = d.challenge(first)["nonce"]
        second = connect_from(peer, port)
        second_nonce = d.challenge(second)["nonce"]
        # The table is full: the newcomer is not turned away, `first` makes room.
        ping_ok(d.authed(sock=connect_from(peer, port)))
        # `first` had the right MAC, and is refused all the same: the reply says nothing of
        # the credentials, only that there was no room, and only to a client that announced
        # it understands ext_busy.
        first.sendall(auth_line(d, first_nonce, ext_busy=True, client_nonce="ab" * 32))
        assert refused(first) == BUSY
        third = connect_from(peer, port)
        d.challenge(third)  # the table is full again
        ping_ok(d.authed(sock=connect_from(peer, port)))  # `second` makes room this time
        second.sendall(auth_line(d, second_nonce))  # an upstream client: no ext_ key
        assert refused(second) == b'{"ok":false}\n'
        wait_for(lambda: d.status()["counters"].get("refused_capacity", 0) == 2)
        third.close()
        # Capacity refusals are our limit, not the peer's fault: no back-off.
        ping_ok(d.authed(sock=connect_from(peer, port)))
        assert d.status()["counters"].get("refused_backoff", 0) == 0
    finally:
        d.close()


def test_a_flood_from_one_source_never_drops_another_sources_waiting_client(peer):
    port = free_port()
    d = ListeningDaemon("--max-handshakes", "8",
                        tcp=[f"127.0.0.1:{port}", f"{peer.root_address}:{port}"])
    try:
        d.wait_ready()
        waiting = connect_from(peer, port)
        nonce = d.challenge(waiting)["nonce"]  # a slow client, its auth line not yet sent
        flood = []
        for _ in range(100):
            sock = d.tcp_connect(port=port)
            d.challenge(sock)
            flood.append(sock)
        wait_for(lambda: d.status()["counters"].get("evicted", 0) >= 80)
        client_nonce = "cd" * 32
        waiting.sendall(auth_line(d, nonce, client_nonce=client_nonce))
        assert json.loads(read_line(waiting))["ok"] is True
        for sock in flood:
            sock.close()
    finally:
        d.close()


class HeldForwarder:
    """A loopback TCP forwarder that passes the daemon's bytes at once and the client's only
    after `release()`: a client whose auth line is late, for as long as the test likes. Each
    connection it takes is held on its own; `challenged` and `release` name the latest."""

    def __init__(self, port: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream_port = port
        self.rounds: list[tuple[threading.Event, threading.Event]] = []
        self.taken = threading.Semaphore(0)
        self.threads: list[threading.Thread] = []
        self.accepting = threading.Thread(target=self._accept, daemon=True)
        self.accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            challenged, released = threading.Event(), threading.Event()
            self.rounds.append((challenged, released))
            thread = threading.Thread(target=self._relay, daemon=True,
                                      args=(client, challenged, released))
            self.threads.append(thread)
            thread.start()
            self.taken.release()

    def _relay(self, client, challenged, released) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))

        def down():
            while data := upstream.recv(65536):
                client.sendall(data)
                challenged.set()
            client.shutdown(socket.SHUT_WR)

        relay = threading.Thread(target=down, daemon=True)
        relay.start()
        released.wait(30)
        while data := client.recv(65536):
            upstream.sendall(data)
        relay.join(30)
        client.close()
        upstream.close()

    def next_challenged(self, timeout: float = 15) -> bool:
        """The next connection came and read its challenge."""
        return self.taken.acquire(timeout=timeout) and self.rounds[-1][0].wait(timeout)

    def release(self) -> None:
        self.rounds[-1][1].set()

    def close(self) -> None:
        for _, released in self.rounds:
            released.set()
        self.listener.close()
        for thread in self.threads:
            thread.join(30)


def test_cli_exits_3_busy_when_squeezed_out_and_4_for_bad_credentials():
    d = ListeningDaemon("--max-handshakes", "2")
    try:
        d.wait_ready()
        forwarder = HeldForwarder(d.port)
        try:
            cli = subprocess.Popen(d.cli_command() + ["ping", f"cmux://127.0.0.1:{forwarder.port}"],
                                   env=d.client_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
            squeezers = []
            # The client tries again a few times (it was told to): squeeze every attempt.
            for attempt in range(BUSY_ATTEMPTS):
                assert forwarder.next_challenged()
                for sock in squeezers:
                    sock.close()
                squeezers = []
                for _ in range(2):  # two newcomers from one source: the CLI's is idle longest
                    sock = d.tcp_connect()
                    d.challenge(sock)
                    squeezers.append(sock)
                wait_for(lambda: d.status()["handshakes_in_flight"] == 3,
                         message="the CLI's attempt to be squeezed out")
                forwarder.release()
            out, err = cli.communicate(timeout=30)
            assert cli.returncode == 3, err
            assert b"busy" in err and b"try again" in err
            assert b"refused the credentials" not in err
            assert d.token.encode() not in out + err
            for sock in squeezers:
                sock.close()
        finally:
            forwarder.close()
        bad = dict(d.client_env(), CMUX_RELAY_TOKEN="ab" * 32)
        out = subprocess.run(d.cli_command() + ["ping", f"cmux://127.0.0.1:{d.port}"],
                             env=bad, capture_output=True, timeout=30)
        assert out.returncode == 4, out.stderr
        assert b"refused the credentials" in out.stderr and b"busy" not in out.stderr
    finally:
        d.close()


def good_clients(argv_prefix: list[str], host: str, port: int, count: int,
                 env: dict) -> list[float]:
    out = subprocess.run(argv_prefix + [sys.executable, str(TESTS / "auth_latency.py"), host,
                                        str(port), str(count)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_an_evicted_handshake_stays_open_until_its_deadline():
    """Closing a handshake the moment it loses its slot would only make a flood reconnect at
    once, and that churn is what costs the gate its time: it is refused at its deadline,
    as are the handshakes that kept their slots (more than one batch of them at once)."""
    count = EXPIRE_BATCH + 8
    d = ListeningDaemon("--max-handshakes", "2")
    try:
        d.wait_ready()
        socks = []
        for _ in range(count):
            sock = d.tcp_connect()
            d.challenge(sock)
            socks.append(sock)
        wait_for(lambda: d.status()["counters"].get("evicted", 0) == count - 2)
        assert d.status()["counters"].get("refused_capacity", 0) == 0
        assert d.status()["handshakes_in_flight"] == count
        first = socks[0]
        first.setblocking(False)
        with pytest.raises(BlockingIOError):
            first.recv(1)  # nothing yet, not even the end of the stream
        for sock in socks:
            assert refused(sock) == b'{"ok":false}\n'  # at its deadline
            sock.close()
        wait_for(lambda: d.status()["handshakes_in_flight"] == 0)
        counters = d.status()["counters"]
        assert counters["refused_capacity"] == count - 2
        assert counters["refused_timeout"] == 2
        assert counters["accepted"] == count
    finally:
        d.close()


def test_good_clients_get_through_a_thousand_idle_connections(far):
    """One source (loopback) holds 1,000 idle pre-auth connections, opening a new one for
    each the daemon drops; good clients on loopback (the flood's own source), and from a
    namespace 200 ms of round trip away (another source), all authenticate, each well
    inside its own 5 s handshake deadline and without being evicted. The round trip is a
    link that delays every packet, the handshake's included (tests/delay_link.py)."""
    port = free_port()
    d = ListeningDaemon(tcp=[f"127.0.0.1:{port}", f"{far.root_address}:{port}"],
                        fd_limit=(8192, 8192))
    flood = None
    try:
        d.wait_ready()
        flood = subprocess.Popen([sys.executable, str(TESTS / "idle_flood.py"), "127.0.0.1",
                                  str(port), "1000"], stdout=subprocess.PIPE, text=True)
        assert flood.stdout.readline().startswith("holding")
        wait_for(lambda: d.status()["counters"].get("evicted", 0) >= 700, timeout=30)
        env = dict(d.client_env(), PYTHONPATH=str(TESTS.parent))
        local = good_clients([], "127.0.0.1", port, 20, env)
        remote = good_clients(far.prefix, far.root_address, port, 10, env)
        assert len(local) == 20 and len(remote) == 10
        assert flood.poll() is None  # the flood held on all along
    finally:
        if flood is not None:
            flood.terminate()
            flood.communicate(timeout=30)
        d.close()
