"""A point-to-point link that delays every IP packet by DELAY_MS in each direction, between
this namespace and the network namespace NETNS: what `tc qdisc ... netem delay` gives, for
kernels built without netem. Two TUN devices, ROOT_IF here and PEER_IF in NETNS, and this
process copying packets between them after the delay. Unlike a delaying TCP forwarder, the
SYN and SYN-ACK wait too, so a connect costs its round trip and the daemon sees each packet
as late as over a long path. The devices go away with this process, which ends when its
stdin does (its maker died) or on SIGTERM. Prints `ready` once both exist (they are
configured by the caller).

    python tests/delay_link.py NETNS ROOT_IF PEER_IF DELAY_MS
"""

from __future__ import annotations

import collections
import fcntl
import os
import selectors
import signal
import struct
import sys
import time

from netns import in_namespace

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def open_tun_in(netns: str, name: str) -> int:
    return in_namespace(netns, lambda: open_tun(name))


def main() -> None:
    netns, root_if, peer_if, delay = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) / 1000
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    root = open_tun(root_if)
    peer = open_tun_in(netns, peer_if)
    other = {root: peer, peer: root}
    # One queue per direction; every packet waits the same time, so each stays in order.
    queues: dict[int, collections.deque] = {root: collections.deque(), peer: collections.deque()}
    sel = selectors.DefaultSelector()
    for fd in (root, peer):
        sel.register(fd, selectors.EVENT_READ)
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        due = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(due) - now) if due else None
        for key, _ in sel.select(timeout):
            if key.fd == sys.stdin.fileno():
                return
            while True:
                try:
                    packet = os.read(key.fd, 65536)
                except BlockingIOError:
                    break
                except OSError:  # the device is down (not yet configured)
                    break
                queues[other[key.fd]].append((time.monotonic() + delay, packet))
        now = time.monotonic()
        for fd, queue in queues.items():
            while queue and queue[0][0] <= now:
                try:
                    os.write(fd, queue.popleft()[1])
                except OSError:
                    pass  # dropped, as a full or down link would


if __name__ == "__main__":
    main()
