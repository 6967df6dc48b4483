"""Fairness before authentication: which peers count as one source, and the table of
handshakes in flight that each source gets only its share of.

One host rarely has one address: a global IPv6 host picks any address of its /64 at will,
and every local user shares loopback. Counting by exact address would let a single host
pass as many; counting too coarsely would make neighbours pay for each other (every tailnet
peer and every host of a ULA or link-local network shares one /64 with the others).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

LOOPBACK = "loopback"
_ONE_HOST_PER_ADDRESS = (
    ipaddress.ip_network("fc00::/7"),   # ULA, the tailnet's fd7a:115c:a1e0::/48 included
    ipaddress.ip_network("fe80::/10"),  # link-local
)


def source_key(addr: str) -> str:
    """The source an address belongs to: loopback as one (every local user shares it, and
    any of them can bind any of 127/8), IPv4 by /32, global IPv6 by /64, ULA and
    link-local IPv6 by /128 (with the link-local scope). Unparsable text counts as given."""
    bare, _, scope = addr.partition("%")
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return addr
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return LOOPBACK
    if ip.version == 4:
        return str(ip)
    if any(ip in net for net in _ONE_HOST_PER_ADDRESS):
        return f"{ip}%{scope}" if scope and ip.is_link_local else str(ip)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


class HandshakeTable:
    """Handshakes waiting for their auth line, per source, each source's in the order they
    were last heard from. When full, room for a newcomer is made by dropping the handshake
    idle longest of the source holding the most (ties: the one whose oldest is idle
    longest). So a flood from one source churns only its own entries, and a real client,
    which sends its auth line one round trip after the challenge, is dropped only by a flood
    from its own source: never by one from elsewhere."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.size = 0
        self._sources: dict[str, OrderedDict] = {}

    def __len__(self) -> int:
        return self.size

    def add(self, entry):
        """Add `entry` (with `.fd`, `.source` and `.active`, its last-heard time); return
        the entry dropped to make room, or None."""
        self._sources.setdefault(entry.source, OrderedDict())[entry.fd] = entry
        self.size += 1
        if self.size <= self.capacity:
            return None
        group = max(self._sources.values(),
                    key=lambda g: (len(g), -next(iter(g.values())).active))
        victim = next(iter(group.values()))
        self.remove(victim)
        return victim

    def heard(self, entry, now: float) -> None:
        """`entry` sent bytes: it is no longer the idle one."""
        entry.active = now
        self._sources[entry.source].move_to_end(entry.fd)

    def remove(self, entry) -> bool:
        group = self._sources.get(entry.source)
        if group is None or group.pop(entry.fd, None) is None:
            return False
        if not group:
            del self._sources[entry.source]
        self.size -= 1
        return True
