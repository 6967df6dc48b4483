"""Logging: the journal with structured fields under systemd, else stderr."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(prefix: str = "cmuxd") -> None:
    """One line per event worth knowing. Under systemd (JOURNAL_STREAM names our stderr)
    and with systemd-python installed, records go to the journal with their fields."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if _stderr_is_journal():
        try:
            from systemd.journal import JournalHandler
        except ImportError:
            pass
        else:
            root.addHandler(JournalHandler(SYSLOG_IDENTIFIER="cmuxd"))
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))
    root.addHandler(handler)


def _stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    if not ino:
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"
