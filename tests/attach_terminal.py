"""`attach` seen from its terminal: a session that counts lines (so a screen can be compared
byte for byte with what the session wrote), the reconnecting status line, and where the
client's connection is served. Shared by the reconnect tests and benchmark."""

from __future__ import annotations

import re
import socket

import psutil

from helpers import wait_for
from listening import ListeningDaemon
from terminal import Terminal

DETACH = b"\x1d"
STATUS = re.compile(rb"\x1b7\x1b\[999;1H\x1b\[2K(.*?)\x1b8", re.S)
CLEARED = b"\x1b7\x1b[999;1H\x1b[2K\x1b8"
SHELL = "PS1='sh> ' exec /bin/sh"
COUNTER = "i=0; while :; do i=$((i+1)); echo line-$i; sleep 0.01; done"
EVERY_LINE = b"".join(b"line-%d\r\n" % i for i in range(1, 200_001))


def reconnecting(seconds: int) -> bytes:
    return f"reconnecting… {seconds} s]".encode()


def attach(d: ListeningDaemon, host: str, command: str) -> Terminal:
    return Terminal(d.cli_command() + ["attach", f"cmux://{host}:{d.port}", "s",
                                       "--command", command], d.client_env())



def last_line(out: bytes) -> int:
    return int(re.findall(rb"line-(\d+)\r\n", out)[-1])


def worker_of(d: ListeningDaemon, pid: int) -> int:
    """The worker serving the TCP connection of process `pid`."""
    def find():
        ports = {c.laddr.port for c in psutil.Process(pid).net_connections("tcp")
                 if c.status == psutil.CONN_ESTABLISHED}
        for w in d.status()["workers"]:
            conns = psutil.Process(w["pid"]).net_connections("tcp")
            if any(c.raddr and c.raddr.port in ports for c in conns):
                return w["pid"]
        return None
    return wait_for(find)



def reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True
