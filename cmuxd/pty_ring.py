"""A session's scrollback: a ring of output bytes in shared memory, counted by absolute offset.

The ring lives in a memfd (an unlinked temporary file where there is none) so that the PTY
hub and a worker holding a session's read lease can both map it: the lease holder appends
what it reads, and when it dies the hub takes the ring over with no copy. Offsets are
absolute and 64-bit (byte N of a session's output is always byte N), and every ring carries
the id of its session's incarnation, so a client can resume exactly where it stopped and tell
a session from a new one under the same name.

Layout: a 64-byte header (magic, capacity, `start`, `head`, incarnation, the monotonic
time of the last input or output), then `capacity`
bytes of data; the byte at absolute offset N sits at N mod capacity. A writer publishes
`start` (the oldest byte still valid once its write is done) before it copies and `head`
after, so a writer killed half-way leaves a ring whose [start, head) is still intact: what it
was copying lies past `head` or below `start`, and is cut.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import time

MAGIC = b"CMUXRNG1"
HEADER = 64
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_CAPACITY, _START, _HEAD, _INCARNATION, _TOUCHED = 8, 16, 24, 32, 48
INCARNATION_BYTES = 16


def _memory_file(size: int) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("cmuxd-scrollback", os.MFD_CLOEXEC)
    else:
        fd, path = tempfile.mkstemp(prefix="cmuxd-scrollback-")
        os.unlink(path)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Ring:
    """One mapping of a ring. The hub makes it (`create`), a lease holder maps the same fd
    (`attach`); both close their own mapping and fd."""

    __slots__ = ("fd", "map", "capacity", "incarnation")

    def __init__(self, fd: int, mapping: mmap.mmap, capacity: int, incarnation: str):
        self.fd = fd
        self.map = mapping
        self.capacity = capacity
        self.incarnation = incarnation

    @classmethod
    def create(cls, capacity: int) -> "Ring":
        fd = _memory_file(HEADER + capacity)
        mapping = mmap.mmap(fd, HEADER + capacity)
        incarnation = os.urandom(INCARNATION_BYTES)
        mapping[0:8] = MAGIC
        _U64.pack_into(mapping, _CAPACITY, capacity)
        mapping[_INCARNATION:_INCARNATION + INCARNATION_BYTES] = incarnation
        ring = cls(fd, mapping, capacity, incarnation.hex())
        ring.touch()
        return ring

    @classmethod
    def attach(cls, fd: int) -> "Ring":
        """Map a ring handed over by its maker; takes ownership of `fd`."""
        try:
            size = os.fstat(fd).st_size
            if size < HEADER:
                raise ValueError("the scrollback ring is too small")
            mapping = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        capacity = _U64.unpack_from(mapping, _CAPACITY)[0]
        if mapping[0:8] != MAGIC or HEADER + capacity != size:
            mapping.close()
            os.close(fd)
            raise ValueError("the scrollback ring has a header this version does not know")
        incarnation = bytes(mapping[_INCARNATION:_INCARNATION + INCARNATION_BYTES]).hex()
        return cls(fd, mapping, capacity, incarnation)

    @property
    def start(self) -> int:
        return _U64.unpack_from(self.map, _START)[0]

    @property
    def head(self) -> int:
        """Absolute offset one past the last byte published."""
        return _U64.unpack_from(self.map, _HEAD)[0]

    def __len__(self) -> int:
        return self.head - self.start

    def touch(self) -> None:
        """Input or output just now (whichever process saw it)."""
        _F64.pack_into(self.map, _TOUCHED, time.monotonic())

    @property
    def touched(self) -> float:
        return _F64.unpack_from(self.map, _TOUCHED)[0]

    def append(self, data: bytes) -> int:
        """Record output; returns the absolute offset of its first byte."""
        mapping, capacity = self.map, self.capacity
        _F64.pack_into(mapping, _TOUCHED, time.monotonic())
        offset = _U64.unpack_from(mapping, _HEAD)[0]
        end = offset + len(data)
        if capacity == 0:
            _U64.pack_into(mapping, _START, end)
            _U64.pack_into(mapping, _HEAD, end)
            return offset
        start = _U64.unpack_from(mapping, _START)[0]
        if end - start > capacity:
            _U64.pack_into(mapping, _START, end - capacity)
        view = memoryview(data)
        if len(view) > capacity:
            view = view[len(view) - capacity:]
        at = (end - len(view)) % capacity
        first = min(len(view), capacity - at)
        mapping[HEADER + at:HEADER + at + first] = view[:first]
        if first < len(view):
            mapping[HEADER:HEADER + len(view) - first] = view[first:]
        _U64.pack_into(mapping, _HEAD, end)
        return offset

    def read(self, since: int | None = None) -> tuple[int, bytes]:
        """The bytes from `since` (or the oldest kept) to the head, and the offset they start
        at, which is later than `since` when the ring no longer holds that far back."""
        start, head = self.start, self.head
        frm = start if since is None else min(max(since, start), head)
        n = head - frm
        if n == 0:
            return frm, b""
        capacity = self.capacity
        at = frm % capacity
        first = min(n, capacity - at)
        data = self.map[HEADER + at:HEADER + at + first]
        if first < n:
            data += self.map[HEADER:HEADER + n - first]
        return frm, data

    def recover(self, known_head: int) -> bool:
        """Take the ring back from a writer that died: keep what it published if the header
        is sane, else cut to the head known before it wrote. Returns whether it was cut."""
        start, head = self.start, self.head
        if known_head <= head and start <= head and head - start <= self.capacity \
                and start >= known_head - self.capacity:
            return False
        _U64.pack_into(self.map, _HEAD, known_head)
        _U64.pack_into(self.map, _START, known_head)
        return True

    def close(self) -> None:
        if self.fd >= 0:
            self.map.close()
            os.close(self.fd)
            self.fd = -1
