"""The sans-IO halves of `attach`'s reconnect: the output cursor (nothing shown twice, a gap
measured, another incarnation refused) and the input ledger (at most once, held input
bounded)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cmuxd.attach import InputLedger, OutputCursor, SessionReplaced

STREAM = bytes(range(256)) * 8


@given(st.lists(st.tuples(st.integers(0, len(STREAM)), st.integers(0, 600)), max_size=30))
def test_overlapping_replays_show_each_byte_once_in_order(chunks):
    """Whatever offsets the daemon's chunks start at (replays overlapping what was shown),
    the screen is a prefix of the stream, never a byte twice."""
    cursor = OutputCursor()
    assert cursor.ready("inc", 0) == 0
    shown = b""
    for start, size in sorted(chunks):
        start = min(start, len(shown))  # within one incarnation chunks never skip ahead
        shown += cursor.data(start, STREAM[start:start + size])
    assert shown == STREAM[:len(shown)]
    assert cursor.offset == len(shown)


def test_a_reattach_past_what_was_shown_reports_the_gap_once():
    cursor = OutputCursor()
    cursor.ready("inc", 0)
    assert cursor.data(0, b"hello") == b"hello"
    assert cursor.ready("inc", 5) == 0
    assert cursor.ready("inc", 105) == 100
    assert cursor.data(105, b"world") == b"world"
    assert cursor.offset == 110


def test_a_first_attach_starts_where_the_ring_does_without_a_gap():
    cursor = OutputCursor()
    assert cursor.ready("inc", 4096) == 0
    assert cursor.offset == 4096


def test_another_incarnation_is_refused():
    cursor = OutputCursor()
    cursor.ready("first", 0)
    with pytest.raises(SessionReplaced):
        cursor.ready("second", 0)


def test_acknowledged_input_is_settled_and_typing_while_away_is_sent_after():
    ledger = InputLedger(limit=8)
    assert [ledger.sent(1), ledger.sent(2)] == [1, 2]
    ledger.acked(2)
    ledger.lost()
    ledger.hold(b"ls\r")
    assert ledger.resume() == (b"ls\r", "")
    assert ledger.sent(1) == 1  # a new attachment counts from 1


def test_unacknowledged_input_is_never_sent_again_and_blind_typing_on_it_is_dropped():
    ledger = InputLedger(limit=8)
    ledger.sent(1)
    ledger.sent(3)
    ledger.acked(1)
    ledger.lost()
    ledger.hold(b"y\r")
    held, notice = ledger.resume()
    assert held == b""
    assert notice == ("input typed just before the link dropped (3 bytes) may or may not have "
                      "reached the session and was not sent again; input typed while "
                      "reconnecting (2 bytes) was dropped; check the screen and type it again")
    assert ledger.resume() == (b"", "")  # said once


def test_doubt_adds_up_over_failed_reattaches():
    ledger = InputLedger()
    ledger.sent(4)
    ledger.lost()
    ledger.lost()
    assert "(4 bytes) may or may not have reached" in ledger.resume()[1]


def test_held_input_is_bounded_and_the_rest_dropped_with_a_notice():
    ledger = InputLedger(limit=4)
    ledger.lost()
    ledger.hold(b"abc")
    ledger.hold(b"defg")
    assert ledger.resume() == (b"abcd", "input typed while reconnecting beyond 4 bytes "
                                        "(3 bytes) was dropped; type it again")
