"""The least a Python daemon can do between a TCP client and a PTY while speaking the cmux
protocol: one process, one asyncio loop, newline-delimited JSON with orjson, base64 both ways,
and nothing else (no authentication, no scrollback, no input queue, one client, one session).
The bench times cmuxd against it to tell the cost of cmuxd's design from the cost of Python.

    python pyrelay.py     # prints the loopback port, serves one client, exits when it leaves
"""

import asyncio
import binascii
import fcntl
import os
import pty
import struct
import termios

import orjson

READ_MAX = 32768  # the output of one pty.data at most, as the spec bounds it (§6.6.1)
BULK = 1024  # a shorter read drained the PTY: no further read to hear EAGAIN


class Relay(asyncio.Protocol):
    def __init__(self, server_box: list, done: asyncio.Future):
        self.server_box, self.done = server_box, done
        self.buf, self.master, self.ident = b"", -1, {}

    def connection_made(self, transport):  # asyncio sets TCP_NODELAY on TCP sockets
        self.transport = transport
        self.server_box[0].close()  # one client only

    def data_received(self, data):
        *lines, self.buf = (self.buf + data).split(b"\n")
        for line in lines:
            msg = orjson.loads(line)
            if msg["method"] == "pty.write":
                os.write(self.master, binascii.a2b_base64(msg["params"]["data_base64"]))
            elif msg["method"] == "pty.attach":
                self.attach(msg["id"], msg["params"])

    def attach(self, rid, p):
        pid, self.master = pty.fork()
        if pid == 0:
            os.execv("/bin/sh", ["sh", "-c", p["command"]])
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("4H", p["rows"], p["cols"], 0, 0))
        os.set_blocking(self.master, False)
        self.ident = {"session_id": p["session_id"], "attachment_id": p["attachment_id"],
                      "attachment_token": p["client_attachment_token"]}
        self.transport.write(orjson.dumps({"id": rid, "ok": True, "result": dict(
            self.ident, attached=True, replay_bytes=0)}) + b"\n")
        self.resume_writing()

    def on_output(self):
        """A Linux PTY hands out at most 4 KiB a read: gather what it has, up to READ_MAX, into
        one event, as a daemon must to keep up with `cat`."""
        data, ended = b"", False
        while len(data) < READ_MAX:
            try:
                got = os.read(self.master, READ_MAX - len(data))
            except BlockingIOError:
                break
            except OSError:  # EIO: the process and the terminal are gone
                got = b""
            ended = not got
            data += got
            if len(got) < BULK:
                break
        if data:
            self.transport.write(orjson.dumps({"event": "pty.data", **self.ident, "data_base64":
                                               binascii.b2a_base64(data, newline=False).decode()})
                                 + b"\n")
        if ended:
            self.transport.close()

    def pause_writing(self):  # the client is behind: leave the output in the PTY
        asyncio.get_running_loop().remove_reader(self.master)

    def resume_writing(self):
        asyncio.get_running_loop().add_reader(self.master, self.on_output)

    def connection_lost(self, exc):
        self.done.set_result(None)


async def main():
    done, box = asyncio.get_running_loop().create_future(), []
    box.append(await asyncio.get_running_loop().create_server(lambda: Relay(box, done),
                                                              "127.0.0.1", 0))
    print(box[0].sockets[0].getsockname()[1], flush=True)
    await done


if __name__ == "__main__":
    asyncio.run(main())
