"""RFC 2782's target order, without DNS: priorities in turn, weights as odds, "." dropped.
The lookup runs against a real DNS server in tests/integration/test_srv.py."""

from __future__ import annotations

import random
from collections import Counter

from cmuxd.client import parse_address
from cmuxd.srv import rfc2782_order


def test_lower_priority_always_comes_first():
    records = [(20, 100, "c.example", 3), (10, 0, "b.example", 2), (0, 1, "a.example", 1)]
    for seed in range(50):
        assert rfc2782_order(records, random.Random(seed)) == [
            ("a.example", 1), ("b.example", 2), ("c.example", 3)]


def test_weights_are_the_odds_of_coming_first_within_a_priority():
    records = [(0, 60, "heavy", 1), (0, 30, "middle", 2), (0, 10, "light", 3), (0, 0, "zero", 4),
               (1, 100, "backup", 5)]
    rng = random.Random(2782)
    firsts = Counter()
    for _ in range(20000):
        order = rfc2782_order(records, rng)
        assert sorted(order[:4]) == [("heavy", 1), ("light", 3), ("middle", 2), ("zero", 4)]
        assert order[4] == ("backup", 5)
        firsts[order[0][0]] += 1
    # Shares of 60:30:10 (weight 0 wins only when the draw is 0: about 1 in 101).
    assert 0.56 < firsts["heavy"] / 20000 < 0.64
    assert 0.26 < firsts["middle"] / 20000 < 0.34
    assert 0.07 < firsts["light"] / 20000 < 0.13
    assert 0 < firsts["zero"] < 20000 * 0.02


def test_all_zero_weights_are_a_uniform_choice():
    records = [(0, 0, f"h{i}", i) for i in range(4)]
    rng = random.Random(7)
    firsts = Counter(rfc2782_order(records, rng)[0][0] for _ in range(8000))
    assert set(firsts) == {"h0", "h1", "h2", "h3"}
    assert all(1600 < n < 2400 for n in firsts.values()), firsts


def test_dot_targets_mean_no_service_there():
    assert rfc2782_order([(0, 0, ".", 1)], random.Random(1)) == []
    assert rfc2782_order([(0, 5, ".", 1), (1, 5, "b", 2)], random.Random(1)) == [("b", 2)]


def test_which_addresses_get_an_srv_lookup(monkeypatch, tmp_path):
    monkeypatch.setenv("CMUX_FLEET", str(tmp_path / "none.json"))
    assert parse_address("honey.example.org").srv
    assert parse_address("cmux://honey.example.org").srv
    assert parse_address("cmux://honey.example.org/").srv
    for literal in ("honey.example.org:5555", "cmux://honey.example.org:6000", "127.0.0.1",
                    "cmux://10.1.2.3", "::1", "[fd7a:115c:a1e0::1]", "localhost",
                    "cmux://api.localhost", "/tmp/x.sock"):
        address = parse_address(literal)
        assert not address.srv, literal
        if address.kind == "tcp" and ":" not in literal.removeprefix("cmux://").strip("[]"):
            assert address.port == 5555
