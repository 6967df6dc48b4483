"""The gate's per-address back-off, driven with explicit clocks."""

from __future__ import annotations

import pytest

from cmuxd.supervisor import gate
from cmuxd.supervisor.gate import Backoff
from cmuxd.supervisor.sources import source_key


def fail(backoff: Backoff, addr: str, times: int, now: float) -> None:
    for _ in range(times):
        backoff.failure(source_key(addr), now)


def blocked(backoff: Backoff, addr: str, now: float) -> bool:
    return backoff.blocked(source_key(addr), now)


def test_an_address_is_blocked_at_the_threshold_for_a_doubling_period():
    b = Backoff(threshold=3, window=60.0, ceiling=8.0)
    fail(b, "100.64.1.2", 2, now=0.0)
    assert not b.blocked("100.64.1.2", 0.0)
    fail(b, "100.64.1.2", 1, now=0.0)
    assert b.blocked("100.64.1.2", 0.5) and not b.blocked("100.64.1.2", 1.0)
    fail(b, "100.64.1.2", 3, now=1.0)
    assert b.blocked("100.64.1.2", 2.5) and not b.blocked("100.64.1.2", 3.0)
    for start in (3.0, 7.0, 15.0):  # 4 s, then 8 s: the ceiling holds
        fail(b, "100.64.1.2", 3, now=start)
    assert b.blocked("100.64.1.2", 22.9) and not b.blocked("100.64.1.2", 23.0)
    assert not b.blocked("100.64.9.9", 0.5)  # other addresses are not affected


def test_a_success_forgets_the_failures():
    b = Backoff(threshold=3, window=60.0, ceiling=8.0)
    fail(b, "192.0.2.7", 2, now=0.0)
    b.success("192.0.2.7")
    fail(b, "192.0.2.7", 2, now=0.0)
    assert not b.blocked("192.0.2.7", 0.0)


@pytest.mark.parametrize("addr", ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"])
def test_loopback_is_never_counted(addr):
    b = Backoff(threshold=1, window=60.0, ceiling=8.0)
    fail(b, addr, 10, now=0.0)
    assert not blocked(b, addr, 0.0)
    assert b.counting == {} and b.punished == {}


def test_an_unparsable_or_scoped_address_is_counted_as_given():
    b = Backoff(threshold=1, window=60.0, ceiling=8.0)
    b.failure("fe80::1%eth0", 0.0)
    assert b.blocked("fe80::1%eth0", 0.5)
    assert not blocked(b, "fe80::1%eth1", 0.5)  # another link, another host


def test_a_global_ipv6_64_is_one_source():
    """A host owns its whole /64: spreading failures over its addresses gains nothing."""
    b = Backoff(threshold=3, window=60.0, ceiling=8.0)
    for i in range(3):
        fail(b, f"2001:db8:7:8::{i + 1:x}", 1, now=0.0)
    assert blocked(b, "2001:db8:7:8:dead:beef::1", 0.5)
    assert not blocked(b, "2001:db8:7:9::1", 0.5)


@pytest.mark.parametrize("prefix", ["fd7a:115c:a1e0::", "fd00:1:2:3::"])
def test_tailnet_and_ula_peers_are_one_address_each(prefix):
    """Every tailnet peer shares one /64: one peer's failures must not block the others."""
    b = Backoff(threshold=3, window=60.0, ceiling=8.0)
    fail(b, prefix + "1", 3, now=0.0)
    assert blocked(b, prefix + "1", 0.5)
    assert not blocked(b, prefix + "2", 0.5)


def test_a_blocked_source_outlives_a_churn_of_failing_ones(monkeypatch):
    monkeypatch.setattr(gate, "BACKOFF_TABLE_MAX", 100)
    b = Backoff(threshold=3, window=60.0, ceiling=60.0)
    fail(b, "192.0.2.1", 3, now=0.0)
    for i in range(1000):  # one failure each from a thousand addresses
        fail(b, f"198.51.{i // 256}.{i % 256}", 1, now=0.5)
    assert blocked(b, "192.0.2.1", 0.9)
    assert len(b.counting) == 100  # the churn stays bounded
    # Its period is remembered too: the next offence doubles it.
    fail(b, "192.0.2.1", 3, now=2.0)
    assert blocked(b, "192.0.2.1", 3.9) and not blocked(b, "192.0.2.1", 4.0)
