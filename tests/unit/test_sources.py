"""Which peers count as one source, and the handshake table's fair eviction."""

from __future__ import annotations

import pytest

from cmuxd.supervisor.sources import LOOPBACK, HandshakeTable, source_key


@pytest.mark.parametrize("addr, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("100.64.1.2", "100.64.1.2"),
    # Global IPv6: a host picks any address of its /64, so the /64 is the host.
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("2a00:1450:4001:82b::200e", "2a00:1450:4001:82b::/64"),
    # Tailnet and other ULA, and link-local: many hosts share one /64, so one address each.
    ("fd7a:115c:a1e0::1", "fd7a:115c:a1e0::1"),
    ("fd7a:115c:a1e0::2", "fd7a:115c:a1e0::2"),
    ("fd00:1:2:3::9", "fd00:1:2:3::9"),
    ("fe80::1%eth0", "fe80::1%eth0"),
    ("fe80::1%eth1", "fe80::1%eth1"),
    # Every local user shares loopback and may bind any of 127/8: one source.
    ("127.0.0.1", LOOPBACK), ("127.3.2.1", LOOPBACK), ("::1", LOOPBACK),
    ("::ffff:127.0.0.1", LOOPBACK),
    ("not an address", "not an address"),
])
def test_source_key(addr, key):
    assert source_key(addr) == key


def test_two_hosts_of_one_tailnet_64_are_two_sources_and_two_of_a_global_64_are_one():
    assert source_key("fd7a:115c:a1e0:ab12::1") != source_key("fd7a:115c:a1e0:ab12::2")
    assert source_key("2001:db8:5:6::1") == source_key("2001:db8:5:6:aaaa::2")
    assert source_key("2001:db8:5:6::1") != source_key("2001:db8:5:7::1")


class Entry:
    def __init__(self, fd: int, source: str, active: float):
        self.fd, self.source, self.active = fd, source, active

    def __repr__(self) -> str:
        return f"Entry({self.fd}, {self.source!r})"


def test_a_full_table_drops_the_idle_longest_of_the_source_holding_the_most():
    table = HandshakeTable(4)
    flood = [Entry(fd, "flood", fd) for fd in range(3)]
    good = Entry(10, "good", 0.5)
    for e in flood[:1] + [good] + flood[1:]:
        assert table.add(e) is None
    # A newcomer from elsewhere takes the flood's oldest slot, not the good client's.
    assert table.add(Entry(11, "other", 5.0)) is flood[0]
    # The flood churns only itself, however long the good client waits.
    for fd in range(20, 40):
        dropped = table.add(Entry(fd, "flood", fd))
        assert dropped.source == "flood"
    assert len(table) == 4
    assert table.remove(good) and not table.remove(good)
    assert len(table) == 3


def test_an_entry_heard_from_is_no_longer_the_idle_one():
    table = HandshakeTable(2)
    a, b = Entry(1, "s", 1.0), Entry(2, "s", 2.0)
    table.add(a)
    table.add(b)
    table.heard(a, 3.0)
    assert table.add(Entry(3, "s", 4.0)) is b


def test_ties_between_sources_drop_the_globally_idle_longest():
    table = HandshakeTable(3)
    entries = [Entry(1, "a", 2.0), Entry(2, "b", 1.0), Entry(3, "c", 3.0)]
    for e in entries:
        table.add(e)
    assert table.add(Entry(4, "d", 4.0)) is entries[1]
