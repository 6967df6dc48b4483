"""Time N good clients, one after another: TCP connect plus the relay handshake, each then
checked with a ping. Prints the latencies in seconds as a JSON list; exits 1 with the
error if any client fails. Credentials come from CMUX_RELAY_ID and CMUX_RELAY_TOKEN. Used by
the tests and the benchmark as the good client, also inside a network namespace.

    python tests/auth_latency.py HOST PORT N
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from cmuxd.client import AsyncClient, ClientError


async def measure(target: str, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        t0 = time.perf_counter()
        client = await AsyncClient.connect(target)
        latencies.append(time.perf_counter() - t0)
        await client.rpc("ping")
        await client.close()
        await asyncio.sleep(0.01)
    return latencies


def main() -> None:
    host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    target = f"cmux://[{host}]:{port}" if ":" in host else f"cmux://{host}:{port}"
    try:
        print(json.dumps(asyncio.run(measure(target, count))))
    except ClientError as exc:
        print(f"{exc} (exit code {exc.exit_code})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
