"""A `cmux` CLI stand-in run inside a PTY session: a plain socket client of
$CMUX_SOCKET_PATH. It prints `PATH <path>` and `READY`, then takes commands on stdin, one a
line, each in a thread of its own so that many requests can wait at once:

    <tag> send <base64 of the request line>   send it, print `REPLY <tag> <base64 of reply>`
    <tag> drop <base64 of the request line>   send it and hang up at once, print `DROPPED <tag>`
    <tag> big <n>                             send n bytes of "x" and an LF, then as `send`
"""

import base64
import os
import socket
import sys
import threading

lock = threading.Lock()


def say(text: str) -> None:
    with lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def run(tag: str, verb: str, arg: str) -> None:
    line = b"x" * int(arg) if verb == "big" else base64.b64decode(arg)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.environ["CMUX_SOCKET_PATH"])
    sender = threading.Thread(target=send_quietly, args=(sock, line + b"\n"))
    sender.start()
    if verb == "drop":
        sender.join()
        sock.close()
        say(f"DROPPED {tag}")
        return
    reply = b""
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            break
        if not data:
            break
        reply += data
    say(f"REPLY {tag} {base64.b64encode(reply).decode()}")
    sock.close()


def send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:  # the daemon refused the rest of an oversized request
        pass


say(f"PATH {os.environ.get('CMUX_SOCKET_PATH', '')}")
say("READY")
for command in sys.stdin:
    parts = command.split()
    if len(parts) == 3:
        threading.Thread(target=run, args=parts).start()
