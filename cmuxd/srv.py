"""The port of a cmux host from DNS: `_cmux._tcp.<name>` SRV records (RFC 2782).

A host name given without a port and absent from cmux.json may publish its port in a zone
its owner runs (`fleet config --srv` prints the records). The lookup must not make a client
noticeably slower than dialing port 5555 straight away, so one deadline covers all of it and
every failure (no such name, no records, SERVFAIL, no answer in time, a "." target, no
resolver configured) means "no records": the caller then dials the name on port 5555.

dnspython is imported here only, and only when a lookup runs.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Sequence

SERVICE = "_cmux._tcp"
DEADLINE = 0.5  # seconds, for every query the lookup makes together


async def lookup(name: str, *, nameservers: Sequence[tuple[str, int]] | None = None,
                 deadline: float = DEADLINE,
                 rng: random.Random | None = None) -> list[tuple[str, int]]:
    """(target, port) pairs in the order RFC 2782 says to try them, [] when DNS has none.

    The resolver is the system's (/etc/resolv.conf, with its search domains) unless
    `nameservers` names (address, port) pairs to ask instead."""
    import dns.asyncresolver
    import dns.exception
    import dns.nameserver

    try:
        resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
        if nameservers is not None:
            resolver.nameservers = [dns.nameserver.Do53Nameserver(address, port)
                                    for address, port in nameservers]
        # dnspython's lifetime may overrun by its retry back-off; the deadline is ours.
        answer = await asyncio.wait_for(
            resolver.resolve(f"{SERVICE}.{name}", "SRV", lifetime=deadline, search=True),
            deadline)
    except (dns.exception.DNSException, TimeoutError):
        return []
    records = [(r.priority, r.weight, r.target.to_text(omit_final_dot=True), r.port)
               for r in answer]
    return rfc2782_order(records, rng or random.SystemRandom())


def rfc2782_order(records: Iterable[tuple[int, int, str, int]],
                  rng: random.Random) -> list[tuple[str, int]]:
    """Lowest priority first; within a priority, a weighted random order (RFC 2782's
    selection: weight-0 records first in the running sums, so beside weighted ones they are
    picked rarely but not never). Records whose target is "." (the service is not offered
    there) are left out."""
    by_priority: dict[int, list[tuple[int, str, int]]] = {}
    for priority, weight, target, port in records:
        if target in ("", "."):
            continue
        by_priority.setdefault(priority, []).append((weight, target, port))
    ordered = []
    for priority in sorted(by_priority):
        remaining = by_priority[priority]
        rng.shuffle(remaining)  # "in any order": a random one, so equal zero weights share
        remaining.sort(key=lambda record: record[0] != 0)
        while remaining:
            pick = rng.randint(0, sum(weight for weight, _, _ in remaining))
            running = 0
            for i, (weight, target, port) in enumerate(remaining):
                running += weight
                if running >= pick:
                    ordered.append((target, port))
                    del remaining[i]
                    break
    return ordered
