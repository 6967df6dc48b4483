"""A TCP forwarder that delays every chunk by DELAY_MS in each direction: a path with a
round trip of 2 × DELAY_MS, for kernels without tc netem. Run in a network namespace, it
makes the daemon see the namespace's address while the client waits as over a long path.
Prints `listening PORT` once it accepts.

    python tests/delay_proxy.py TARGET_HOST TARGET_PORT DELAY_MS
"""

from __future__ import annotations

import asyncio
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    async def deliver() -> None:
        while (item := await queue.get()) is not None:
            due, data = item
            await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(data)
            await writer.drain()
        await asyncio.sleep(delay)
        writer.close()

    sender = asyncio.create_task(deliver())
    while data := await reader.read(65536):
        queue.put_nowait((loop.time() + delay, data))
    queue.put_nowait(None)
    await sender


async def main() -> None:
    host, port, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) / 1000

    async def serve(client_r, client_w) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(host, port)
            await asyncio.gather(pipe(client_r, up_w, delay), pipe(up_r, client_w, delay))
        except OSError:
            client_w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
