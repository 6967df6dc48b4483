"""The scrollback ring: absolute offsets, wrap-around, and recovery from a writer that died."""

from __future__ import annotations

import os
import struct

import pytest

from cmuxd.pty_ring import HEADER, MAGIC, Ring

_U64 = struct.Struct("<Q")
_START, _HEAD = 16, 24


@pytest.fixture
def rings():
    made: list[Ring] = []

    def make(capacity: int) -> Ring:
        ring = Ring.create(capacity)
        made.append(ring)
        return ring

    yield make
    for ring in made:
        ring.close()


def stream(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def test_appends_wrap_around_and_keep_the_newest_capacity_bytes(rings):
    ring = rings(10)
    data = stream(37)
    offsets = [ring.append(data[i:i + 7]) for i in range(0, 37, 7)]
    assert offsets == [0, 7, 14, 21, 28, 35]
    assert (ring.start, ring.head, len(ring)) == (27, 37, 10)
    assert ring.read() == (27, data[27:])


def test_read_since_before_start_inside_and_at_head(rings):
    ring = rings(16)
    data = stream(40)
    ring.append(data[:25])
    ring.append(data[25:])
    assert ring.read(0) == (24, data[24:])  # older than kept: from the oldest kept
    assert ring.read(30) == (30, data[30:])  # inside, across the wrap
    assert ring.read(40) == (40, b"")
    assert ring.read(99) == (40, b"")  # past the head: nothing, at the head


def test_data_larger_than_the_capacity_keeps_its_tail(rings):
    ring = rings(8)
    ring.append(b"abc")
    data = stream(100)
    assert ring.append(data) == 3
    assert (ring.start, ring.head) == (95, 103)
    assert ring.read() == (95, data[-8:])


def test_capacity_zero_counts_offsets_and_keeps_nothing(rings):
    ring = rings(0)
    assert ring.append(b"hello") == 0
    assert ring.append(b"world!") == 5
    assert (ring.start, ring.head, len(ring)) == (11, 11, 0)
    assert ring.read() == (11, b"")
    assert ring.read(3) == (11, b"")


def test_two_mappings_of_one_ring_see_each_others_appends(rings):
    hub = rings(32)
    holder = Ring.attach(os.dup(hub.fd))
    try:
        assert holder.incarnation == hub.incarnation and holder.capacity == 32
        hub.append(b"from the hub;")
        holder.append(b"from the lease holder")
        assert hub.read() == holder.read() == (2, b"om the hub;from the lease holder")
        assert hub.head == holder.head == 34
    finally:
        holder.close()


def test_each_ring_has_its_own_incarnation(rings):
    a, b = rings(8), rings(8)
    assert a.incarnation != b.incarnation and len(a.incarnation) == 32
    int(a.incarnation, 16)


def test_a_writer_killed_mid_append_leaves_start_to_head_intact(rings):
    """What `append` does up to its copy, then the process dies before publishing `head`."""
    ring = rings(16)
    data = stream(30)
    ring.append(data[:20])
    known = ring.head
    assert ring.read() == (4, data[4:20])
    # The next append of 10 bytes publishes start = 30 - 16 = 14, copies 6 of its 10 bytes
    # over [4, 10) of the stream's slots, and dies.
    _U64.pack_into(ring.map, _START, 14)
    at = 20 % 16
    ring.map[HEADER + at:HEADER + at + 6] = b"XXXXXX"
    assert ring.recover(known) is False
    assert (ring.start, ring.head) == (14, 20)
    assert ring.read() == (14, data[14:20])
    assert ring.append(data[20:]) == 20  # the hub carries on from the published head
    assert ring.read() == (14, data[14:30])


@pytest.mark.parametrize("start, head", [
    (0, 5),        # head went backwards past what the hub knew
    (0, 100),      # head - start > capacity
    (50, 40),      # start past head
    (10, 18),      # a sane span that ends before the head the hub knew
], ids=["head-behind-known", "span-over-capacity", "start-after-head", "sane-span-behind"])
def test_an_insane_header_is_cut_to_the_known_head(rings, start, head):
    ring = rings(16)
    ring.append(stream(20))
    known = ring.head
    _U64.pack_into(ring.map, _START, start)
    _U64.pack_into(ring.map, _HEAD, head)
    assert ring.recover(known) is True
    assert (ring.start, ring.head) == (known, known)
    assert ring.read() == (known, b"")
    assert ring.append(b"next") == known
    assert ring.read() == (known, b"next")


def _memfd(content: bytes) -> int:
    fd = os.memfd_create("test-ring")
    os.write(fd, content)
    return fd


def _fd_is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@pytest.mark.parametrize("content, message", [
    (b"", "too small"),
    (MAGIC + b"\0" * 20, "too small"),
    (b"NOTARING" + _U64.pack(8) + b"\0" * (HEADER - 16 + 8), "does not know"),
    (MAGIC + _U64.pack(4096) + b"\0" * (HEADER - 16 + 8), "does not know"),
    (MAGIC + _U64.pack(2 ** 64 - 1) + b"\0" * (HEADER - 16), "does not know"),
], ids=["empty", "short-header", "bad-magic", "capacity-past-the-file", "capacity-huge"])
def test_attach_refuses_what_is_not_a_ring_and_closes_its_fd(content, message):
    fd = _memfd(content)
    with pytest.raises(ValueError, match=message):
        Ring.attach(fd)
    assert _fd_is_closed(fd)


def test_attach_refuses_an_fd_that_cannot_be_mapped():
    r, w = os.pipe()
    try:
        with pytest.raises((ValueError, OSError)):
            Ring.attach(r)
        assert _fd_is_closed(r)
    finally:
        os.close(w)


def test_attach_refuses_a_closed_fd():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError):
        Ring.attach(r)
