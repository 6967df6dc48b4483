"""How long `attach` takes to get a session back: prints figures, asserts nothing.

    .venv/bin/python tests/bench/reconnect.py [--cycles 10]

* path: a daemon in a network namespace reached over a veth (root and `ip netns` needed);
  the veth is taken down until the client shows its reconnecting line and a random 0-2 s
  more (so the path comes back at any point between two attempts), then brought up; timed
  from `ip link set up` to the status line cleared (the session attached again). The client
  dials at most a second apart, so the figure sits between the dial and the back-off cap.
* worker: the worker holding the attach is SIGKILLed on loopback; timed from the kill to the
  status line cleared.
"""

from __future__ import annotations

import argparse
import os
import random
import select
import signal
import statistics
import sys
import time
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS_DIR))

from attach_terminal import (  # noqa: E402
    CLEARED,
    COUNTER,
    DETACH,
    reachable,
    reconnecting,
    worker_of,
)
from listening import ListeningDaemon, free_port  # noqa: E402
from netns import PeerNamespace, ip, netns_permitted  # noqa: E402
from terminal import Terminal  # noqa: E402


def until(term: Terminal, want: bytes, after: int, timeout: float = 20) -> float:
    """The time `want` shows up in the terminal's output past byte `after`."""
    deadline = time.monotonic() + timeout
    while want not in term.out[after:]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{want!r} not seen within {timeout} s")
        if select.select([term.fd], [], [], 0.01)[0]:
            term.out += os.read(term.fd, 65536)
    return time.monotonic()


def cycles_over_path(cycles: int) -> list[float]:
    tag = str(os.getpid() % 100000 + 4)
    why = netns_permitted(f"cmuxd-peer-{tag}-probe")
    if why is not None:
        print(f"path: skipped: {why}")
        return []
    ns = PeerNamespace(tag, subnet=217)
    port = free_port()
    d = ListeningDaemon(workers=1, tcp=[f"{ns.peer_address}:{port}"],
                        wrap=["ip", "netns", "exec", ns.name])
    d.port = port
    term = None
    try:
        d.wait_ready()
        while not reachable(ns.peer_address, port):
            time.sleep(0.05)
        term = Terminal(d.cli_command() + ["attach", f"cmux://{ns.peer_address}:{port}", "s",
                                           "--command", COUNTER], d.client_env())
        until(term, b"line-10\r\n", 0)
        took = []
        pause = random.Random(17)
        for _ in range(cycles):
            mark = len(term.out)
            ip("link", "set", ns.link, "down")
            until(term, reconnecting(1), mark)
            time.sleep(pause.uniform(0, 2))
            mark = len(term.out)
            ip("link", "set", ns.link, "up")
            back = time.monotonic()
            took.append(until(term, CLEARED, mark) - back)
        return took
    finally:
        if term is not None:
            term.write(DETACH)
            term.close()
        d.close()
        ns.close()


def cycles_after_worker_kill(cycles: int) -> list[float]:
    d = ListeningDaemon(workers=2).wait_ready()
    term = Terminal(d.cli_command() + ["attach", f"cmux://127.0.0.1:{d.port}", "s",
                                       "--command", COUNTER], d.client_env())
    try:
        until(term, b"line-10\r\n", 0)
        took = []
        for _ in range(cycles):
            worker = worker_of(d, term.pid)
            mark = len(term.out)
            os.kill(worker, signal.SIGKILL)
            killed = time.monotonic()
            took.append(until(term, CLEARED, mark) - killed)
            while sum(w["alive"] for w in d.status()["workers"]) < 2:
                time.sleep(0.05)
        return took
    finally:
        term.write(DETACH)
        term.close()
        d.close()


def report(name: str, took: list[float]) -> None:
    if not took:
        return
    ms = sorted(t * 1000 for t in took)
    print(f"{name}: median {statistics.median(ms):.0f} ms, min {ms[0]:.0f}, max {ms[-1]:.0f} "
          f"over {len(ms)} reconnects ({', '.join(f'{t:.0f}' for t in ms)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10, help="reconnects per measurement")
    args = parser.parse_args()
    report("path back -> reattached", cycles_over_path(args.cycles))
    report("worker killed -> reattached", cycles_after_worker_kill(args.cycles))


if __name__ == "__main__":
    main()
