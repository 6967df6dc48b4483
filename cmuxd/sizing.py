"""The size rule shared by session.* and PTY sessions: the smallest screen wins (spec §6.5.3).

A module of its own so that the PTY hub and the handlers apply one rule without importing
each other.
"""

from __future__ import annotations


class SizeCoordinator:
    """Attachments with a size each; the effective size is the per-axis minimum.

    With no attachment left the last size is retained, so a terminal that every client
    detached from keeps its geometry.
    """

    def __init__(self):
        self.attachments: dict[str, dict] = {}
        self.last_cols = 0
        self.last_rows = 0

    def set(self, attachment_id: str, cols: int, rows: int, **extra) -> None:
        self.attachments[attachment_id] = {"cols": cols, "rows": rows, **extra}
        self._recompute()

    def remove(self, attachment_id: str) -> None:
        del self.attachments[attachment_id]
        self._recompute()

    def _recompute(self) -> None:
        if self.attachments:
            self.last_cols = min(a["cols"] for a in self.attachments.values())
            self.last_rows = min(a["rows"] for a in self.attachments.values())

    @property
    def size(self) -> tuple[int, int]:
        return self.last_cols, self.last_rows

    def snapshot(self, session_id: str, fields: tuple[str, ...]) -> dict:
        attachments = []
        for aid in sorted(self.attachments, key=lambda s: s.encode("utf-8", "surrogatepass")):
            a = self.attachments[aid]
            attachments.append({"attachment_id": aid, **{k: a[k] for k in fields}})
        return {
            "session_id": session_id,
            "attachments": attachments,
            "effective_cols": self.last_cols,
            "effective_rows": self.last_rows,
            "last_known_cols": self.last_cols,
            "last_known_rows": self.last_rows,
        }
