"""The gate's per-address back-off, driven with explicit clocks."""

from __future__ import annotations

import pytest

from cmuxd.supervisor.gate import Backoff


def fail(backoff: Backoff, addr: str, times: int, now: float) -> None:
    for _ in range(times):
        backoff.failure(addr, now)


def test_an_address_is_blocked_at_the_threshold_for_a_doubling_period():
    b = Backoff(threshold=3, window=60.0, ceiling=8.0)
    fail(b, "100.64.1.2", 2, now=0.0)
    assert not b.blocked("100.64.1.2", 0.0)
    b.failure("100.64.1.2", 0.0)
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
    assert not b.blocked(addr, 0.0)
    assert b.table == {}


def test_an_unparsable_or_scoped_address_is_counted_as_given():
    b = Backoff(threshold=1, window=60.0, ceiling=8.0)
    b.failure("fe80::1%eth0", 0.0)
    assert b.blocked("fe80::1%eth0", 0.5)
