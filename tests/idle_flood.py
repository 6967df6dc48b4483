"""Hold N idle pre-auth connections to a relay: read the challenge, send nothing, and open a
new connection for each one the daemon closes, so N stay held however the daemon makes
room. Prints `holding N` once all N were opened, runs until SIGTERM, then prints how many
connections it opened in all. Used by the tests and the benchmark as the attacker.

    python tests/idle_flood.py HOST PORT N
"""

from __future__ import annotations

import resource
import selectors
import signal
import socket
import sys


def main() -> None:
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    want = count + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sel = selectors.DefaultSelector()
    opened = 0

    def open_one() -> None:
        nonlocal opened
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex((host, port))
        sel.register(sock, selectors.EVENT_READ)
        opened += 1

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        for _ in range(count):
            open_one()
        print(f"holding {count}", flush=True)
        while True:
            for key, _ in sel.select():
                sock = key.fileobj
                try:
                    if sock.recv(65536):
                        continue  # the challenge (or a reply): read, never answered
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    pass
                sel.unregister(sock)
                sock.close()
                open_one()
    finally:
        print(f"opened {opened}", flush=True)


if __name__ == "__main__":
    main()
