"""Network namespaces for tests that need a peer address other than loopback. Everything
made here is removed by the maker; without permission to make a namespace, callers skip
with the reason `netns_permitted` gives."""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

CLONE_NEWNET = 0x40000000


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def netns_permitted(probe: str) -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    result = ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` is not permitted here: {result.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


@contextmanager
def namespace_or_skip(probe: str, make):
    """For a test: the namespace `make()` returns, closed afterwards; the test is skipped
    where this machine does not let us make namespaces (named `probe` to find out)."""
    reason = netns_permitted(probe)
    if reason is not None:
        import pytest  # here only: the benches use this module without pytest

        pytest.skip(reason)
    ns = make()
    try:
        yield ns
    finally:
        ns.close()


class PeerNamespace:
    """A namespace joined to ours by a veth pair: we are `root_address`, sockets made by
    `socket()` come from `peer_address`."""

    def __init__(self, tag: str, subnet: int = 213):
        self.name = f"cmuxd-peer-{tag}"
        self.link = f"cxp{tag}"
        self.root_address = f"10.{subnet}.{int(tag) % 250}.1"
        self.peer_address = f"10.{subnet}.{int(tag) % 250}.2"
        ip("netns", "add", self.name)
        try:
            ip("link", "add", self.link, "type", "veth", "peer", "name", f"{self.link}p")
            ip("link", "set", f"{self.link}p", "netns", self.name)
            ip("addr", "add", f"{self.root_address}/30", "dev", self.link)
            ip("link", "set", self.link, "up")
            ip("-n", self.name, "addr", "add", f"{self.peer_address}/30", "dev", f"{self.link}p")
            ip("-n", self.name, "link", "set", f"{self.link}p", "up")
            ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def socket(self) -> socket.socket:
        """A TCP socket of the namespace."""
        return in_namespace(self.name, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))

    def close(self) -> None:
        ip("netns", "del", self.name, check=False)
        ip("link", "del", self.link, check=False)  # gone with its peer, usually


def in_namespace(name: str, make):
    """What `make()` returns, made on a thread that joined network namespace `name`: a socket
    or a device keeps the namespace it was made in, whichever thread uses it later, and this
    thread stays where it is."""
    made: list = []

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
            made.append(make())
        except OSError as exc:
            made.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


class DelayedNamespace:
    """A namespace joined to ours by a link that delays each packet `delay_ms` each way (a
    round trip of twice that, handshake packets included): the long path `tc netem` would
    make, from tests/delay_link.py since this kernel may have no netem. We are
    `root_address`; sockets made by `socket()` or programs run with `prefix` come from
    `peer_address`."""

    def __init__(self, tag: str, delay_ms: int, subnet: int = 218):
        self.name = f"cmuxd-far-{tag}"
        self.root_address = f"10.{subnet}.{int(tag) % 250}.1"
        self.peer_address = f"10.{subnet}.{int(tag) % 250}.2"
        self.prefix = ["ip", "netns", "exec", self.name]
        root_if, peer_if = f"cxd{tag}", f"cxd{tag}p"
        self.link = None
        ip("netns", "add", self.name)
        try:
            self.link = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("delay_link.py")), self.name,
                 root_if, peer_if, str(delay_ms)],
                stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
            if self.link.stdout.readline().strip() != "ready":
                raise RuntimeError("the delaying link did not start (its error is above)")
            ip("addr", "add", self.root_address, "peer", self.peer_address, "dev", root_if)
            ip("link", "set", root_if, "up")
            ip("-n", self.name, "addr", "add", self.peer_address, "peer", self.root_address,
               "dev", peer_if)
            ip("-n", self.name, "link", "set", peer_if, "up")
            ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    socket = PeerNamespace.socket

    def close(self) -> None:
        if self.link is not None:
            self.link.stdin.close()
            self.link.wait(30)
            self.link.stdout.close()
        ip("netns", "del", self.name, check=False)
