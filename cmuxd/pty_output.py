"""Reading one PTY: record its output in the ring and fan it out, paced by the attachments.

The PTY hub runs one `OutputPump` per session it reads itself; a worker holding a session's
read lease runs one for that session instead. One class for both, so the pacing rule is the
same whichever process reads:

Each attachment counts the frames queued for it and not yet reported written (`behind`); a
frame its connection writes at once (the echo of a keystroke, a client that keeps up) is
never counted.
While some attachment is `BEHIND_FRAMES` behind, the PTY is not read and the process blocks
on its terminal as it would on a slow real one. An attachment that stays that far behind for
`stall_timeout` while another keeps up stops counting (`slow`); it fills its queue and is
dropped by its owner, so one client that stops reading cannot stall everyone else.
"""

from __future__ import annotations

import asyncio
import binascii
import errno
import logging
import os
from collections.abc import Callable

from .pty_ring import Ring
from .pty_rules import BEHIND_FRAMES, BULK_READ, READ_MAX

log = logging.getLogger("cmuxd.hub")


class OutputPump:
    __slots__ = ("name", "master", "ring", "attachments", "send_data", "on_eof",
                 "stall_timeout", "reading", "closed", "stall_timer")

    def __init__(self, name: str, master: int, ring: Ring, attachments: dict,
                 send_data: Callable[[object, bytes, int], bool], on_eof: Callable[[], None],
                 stall_timeout: float):
        self.name = name
        self.master = master
        self.ring = ring
        self.attachments = attachments
        """The owner's table; each attachment has `behind` and `slow`."""
        self.send_data = send_data
        """(attachment, base64 payload, offset) -> True if written to its connection at
        once, False if queued (counted in its `behind`) or dropped."""
        self.on_eof = on_eof
        self.stall_timeout = stall_timeout
        self.reading = False
        self.closed = False
        self.stall_timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        """Stop for good (the session ended, or the lease went back)."""
        self.closed = True
        self._read_off()
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None

    def _read_on(self) -> None:
        if not self.reading and not self.closed:
            asyncio.get_running_loop().add_reader(self.master, self._on_readable)
            self.reading = True

    def _read_off(self) -> None:
        if self.reading:
            asyncio.get_running_loop().remove_reader(self.master)
            self.reading = False

    def _on_readable(self) -> None:
        data, eof = self._read_ready()
        if data:
            offset = self.ring.append(data)
            if self.attachments:
                encoded = binascii.b2a_base64(data, newline=False)
                send_data = self.send_data
                queued = False
                for att in list(self.attachments.values()):
                    if not send_data(att, encoded, offset):
                        queued = True
                if queued:  # a frame written at once changes nobody's `behind`
                    self.update()
        if eof:
            self.close()
            self.on_eof()

    def _read_ready(self) -> tuple[bytes, bool]:
        """What the PTY has ready, up to READ_MAX, and whether it has ended. A PTY read returns
        at most about 4 KiB (the line discipline's buffer), so after a large read (bulk output)
        the PTY is read on until it has nothing more: one event per 32 KiB rather than per
        4 KiB. A small read (typing, a prompt) is passed on at once, with no extra read."""
        chunks = []
        size = 0
        eof = False
        while size < READ_MAX:
            try:
                data = os.read(self.master, READ_MAX - size)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.EIO:
                    log.warning("reading PTY %s failed: %s", self.name, exc)
                eof = True
                break
            if not data:
                eof = True
                break
            chunks.append(data)
            size += len(data)
            if len(data) < BULK_READ:
                break
        return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), eof

    def update(self) -> None:
        """Read the PTY unless an attachment that still counts is far behind."""
        if self.closed:
            return
        held = any(a.behind >= BEHIND_FRAMES and not a.slow for a in self.attachments.values())
        if held and self.reading:
            self._read_off()
            if self.stall_timer is None:
                self.stall_timer = asyncio.get_running_loop().call_later(
                    self.stall_timeout, self._stalled
                )
        elif not held:
            if self.stall_timer is not None:
                self.stall_timer.cancel()
                self.stall_timer = None
            self._read_on()

    def drained(self) -> None:
        """An attachment caught up. That can only end a hold, so while the PTY is read
        (every keystroke's echo) there is nothing to look at."""
        if not self.reading or self.stall_timer is not None:
            self.update()

    def _stalled(self) -> None:
        """Held back for the whole stall timeout. If some attachment is keeping up, the ones
        behind stop counting, and will be dropped when their queues overflow. If every one is
        behind, nobody is kept waiting: the process stays blocked, as on a real terminal whose
        reader paused, and none is dropped."""
        self.stall_timer = None
        behind = [a for a in self.attachments.values() if a.behind >= BEHIND_FRAMES]
        if len(behind) == len(self.attachments):
            self.stall_timer = asyncio.get_running_loop().call_later(
                self.stall_timeout, self._stalled
            )
            return
        for att in behind:
            att.slow = True
        self.update()
