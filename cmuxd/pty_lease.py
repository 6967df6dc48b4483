"""A worker's side of a read lease: it reads a PTY session that the hub lent it.

While every attachment of a session is served by one worker, the hub lends that worker the
session's reading (a dup of the PTY master and the ring, over SCM_RIGHTS): the worker reads
output, appends it to the shared ring and queues pty.data for its connections itself, and
writes keystrokes straight to the PTY. A keystroke and its echo then cross one cmuxd process.

Input the PTY does not take at once goes to the hub's input queue, which outlives this
worker; from then on every write goes there too, until the hub says it has written them all,
so input keeps its order. The lease goes back when the hub asks for it (the set of
attachments changes), when an attachment here must be dropped, or at the PTY's end.
"""

from __future__ import annotations

import hmac
import logging
import os

from .protocol import PTY_INPUT_QUEUE_FULL, PTY_INPUT_SEQ_GAP, RPCError
from .pty_output import OutputPump
from .pty_ring import Ring
from .pty_rules import (
    INPUT_CHUNK,
    MSG_QUEUE_FULL,
    STALL_TIMEOUT,
    AttachmentEvents,
    data_frame_head,
    token_bytes,
)

log = logging.getLogger("cmuxd.worker")


class LeasedAttachment(AttachmentEvents):
    __slots__ = ("lease", "id", "token", "token_bytes", "peer", "key", "next_seq", "acked",
                 "seq_ack", "slow", "ext", "frame_head")

    def __init__(self, lease: "WorkerLease", entry: dict):
        self.lease = lease
        self.id = entry["attachment_id"]
        self.token = entry["token"]
        self.token_bytes = token_bytes(self.token)
        self.peer = entry["peer"]
        self.key = (lease.session_id, self.id, self.token)
        self.next_seq = entry["next_seq"]
        self.acked = entry["acked"]
        self.seq_ack = entry["seq_ack"]
        self.slow = entry["slow"]
        self.ext = entry["ext"]
        self.frame_head = data_frame_head(*self.key)

    @property
    def behind(self) -> int:
        return self.lease.remote.behind.get(self.key, 0)


class WorkerLease:
    def __init__(self, remote, msg: dict, fds: list[int]):
        self.remote = remote
        self.session_id: str = msg["session_id"]
        self.id: int = msg["lease"]
        self.master = fds[0]
        try:
            self.ring = Ring.attach(fds[1])
        except BaseException:
            os.close(self.master)
            raise
        self.attachments = {e["attachment_id"]: LeasedAttachment(self, e)
                            for e in msg["attachments"]}
        self.queued_before = bool(msg["busy"])
        """The hub's queue held input when it lent us the session."""
        self.forwarded: set[int] = set()
        """Inputs sent to the hub's queue that it has not yet written."""
        self.dropped: list[str] = []
        self.eof = False
        self.closed = False
        self.pump = OutputPump(self.session_id, self.master, self.ring, self.attachments,
                               self._send_data, self._on_eof, STALL_TIMEOUT)
        self.pump.update()

    def find(self, attachment_id: str, token: str) -> LeasedAttachment | None:
        att = self.attachments.get(attachment_id)
        if att is None or not hmac.compare_digest(att.token_bytes, token_bytes(token)):
            return None
        return att

    # output

    def _send_data(self, att: LeasedAttachment, encoded: bytes, offset: int) -> bool:
        """Output read here (see OutputPump.send_data): the attachment's connection writes it
        at once if nothing of it waits; else it is queued as an event and counted."""
        send_now = self.remote.direct.get(att.peer)
        if send_now is not None and send_now(att.key, att.data_frame(encoded, offset)):
            return True
        self._send(att, att.data_event(encoded.decode("ascii"), offset))
        return False

    def _send(self, att: LeasedAttachment, event: dict) -> bool:
        if self.remote.deliver(att.peer, event):
            return True
        # Its queue overflowed: drop it here, and hand the session back so the hub forgets
        # it too (and lends it again for the others).
        log.info("PTY %s attachment %s fell behind and was dropped", self.session_id, att.id)
        del self.attachments[att.id]
        self.dropped.append(att.id)
        self.remote.deliver(att.peer, att.event("pty.exit"))
        self.pump.close()
        self.remote.loop.call_soon(self.give_back)
        return False

    def _on_eof(self) -> None:
        self.eof = True
        self.give_back()

    def drained(self) -> None:
        self.pump.drained()

    # input

    def busy(self) -> bool:
        return self.queued_before or bool(self.forwarded)

    def write(self, att: LeasedAttachment, data: bytes, seq: int | None, notification: bool):
        """Write at once when nothing of ours waits in the hub's queue and the PTY takes it
        all; else forward to the hub's queue (the rest of a partial write is forced in, so a
        write is never half applied)."""
        if seq is not None and seq != att.next_seq:
            raise RPCError(PTY_INPUT_SEQ_GAP, f"PTY input sequence gap: got {seq}, want {att.next_seq}")
        force = False
        if not self.busy() and len(data) <= INPUT_CHUNK:
            try:
                written = os.write(self.master, data) if data else 0
            except BlockingIOError:
                written = 0
            except OSError as exc:
                log.info("writing to PTY %s failed: %s", self.session_id, exc)
                written = len(data)
            self.ring.touch()
            if written == len(data):
                if seq is not None:
                    att.next_seq = seq + 1
                    self.ack(att, seq)
                return {"written": len(data)}
            data, force = data[written:], written > 0
        if not force and self.remote.link_full():
            raise RPCError(PTY_INPUT_QUEUE_FULL, MSG_QUEUE_FULL)
        fid = self.remote.forward_input(self, att, data, seq, force, notification)
        self.forwarded.add(fid)
        if seq is not None and (notification or force):
            att.next_seq = seq + 1
        if notification or force:
            return {"written": len(data)}
        return self.remote.reply_of(fid, att, seq, len(data))

    def ack(self, att: LeasedAttachment, seq: int) -> None:
        if att.seq_ack and seq > att.acked and att.id in self.attachments:
            att.acked = seq
            self._send(att, att.event("pty.input_ack", seq=seq))

    def input_done(self, msg: dict) -> None:
        for fid in msg["fids"]:
            self.forwarded.discard(fid)
        if msg["idle"]:
            self.queued_before = False
        for aid, seq in msg["acks"].items():
            att = self.attachments.get(aid)
            if att is not None:
                self.ack(att, seq)

    def input_refused(self, fid: int) -> None:
        self.forwarded.discard(fid)

    # the end of the lease

    def give_back(self) -> None:
        """Stop reading and tell the hub what changed while we read."""
        if self.closed:
            return
        state = {
            "attachments": [
                {"attachment_id": a.id, "next_seq": a.next_seq, "acked": a.acked,
                 "behind": a.behind, "slow": a.slow}
                for a in self.attachments.values()
            ],
            "dropped": self.dropped,
            "eof": self.eof,
        }
        self.close()
        self.remote.lease_given_back(self, state)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.pump.close()
        self.ring.close()
        os.close(self.master)
        self.remote.leases.pop(self.session_id, None)

