"""Benchmark of the CLI bridge: prints figures, asserts nothing.

    .venv/bin/python tests/bench/cli_bridge.py [--requests 500] [--workers 1]

A process inside a PTY session of a listening daemon sends requests to $CMUX_SOCKET_PATH one
after another (a fresh connection each, as the CLI does); a subscribed TCP client answers each
cli.request at once. The figure is the CLI's time from connect to reply: socket → hub →
(link) → worker → client and back.
"""

from __future__ import annotations

import argparse
import base64
import shutil
import sys
import tempfile
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS_DIR))

from listening import ListeningDaemon  # noqa: E402

CLI = """
import os, socket, sys, time
path = os.environ["CMUX_SOCKET_PATH"]
times = []
input()
for i in range(int(sys.argv[1])):
    t0 = time.perf_counter()
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b'{"method":"notification.create","params":{"title":"t"}}\\n')
    reply = b""
    while not reply.endswith(b"\\n"):
        reply += s.recv(65536)
    s.close()
    times.append(time.perf_counter() - t0)
times.sort()
print("RESULT", times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cmuxd-bench-"))
    script = folder / "cli.py"
    script.write_text(CLI)
    daemon = ListeningDaemon(workers=args.workers).wait_ready()
    try:
        app = daemon.authed()
        ident = {"session_id": "bench", "attachment_id": "a", "client_attachment_token": "t"}
        assert app.call("pty.attach", dict(ident, cols=200, rows=50, command=(
            f"stty -echo; exec {sys.executable} {script} {args.requests}")))["ok"]
        assert app.call("ext.cli.subscribe")["ok"]
        app.send({"id": 1, "method": "pty.write", "params": dict(
            ident, data_base64=base64.b64encode(b"go\n").decode())})
        answer = base64.b64encode(b'{"ok":true,"result":{}}').decode()
        out = b""
        while b"RESULT" not in out or not out.endswith(b"\n"):
            msg = app.recv_frame(timeout=120)
            if msg.get("event") == "cli.request":
                app.send({"id": msg["request_id"], "method": "cli.response", "params": {
                    "request_id": msg["request_id"], "data_base64": answer}})
            elif msg.get("event") == "pty.data":
                out += base64.b64decode(msg["data_base64"])
        p50, p99 = out.split(b"RESULT")[1].split()
        print(f"CLI bridge round trip ({args.requests} requests, {args.workers} worker(s)): "
              f"p50 {float(p50):.0f} µs, p99 {float(p99):.0f} µs")
    finally:
        daemon.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
