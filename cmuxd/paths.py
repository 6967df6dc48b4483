"""Where a daemon's sockets live. Kept apart from config so that the front door of
`serve --stdio` can find the daemon without importing what the daemon's options need."""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_STATE_DIR = "/run/cmuxd"
"""The state directory of the --system unit (%t/cmuxd of the system instance)."""


def runtime_dir() -> Path:
    """Where the daemon keeps its sockets: $XDG_RUNTIME_DIR/cmuxd, else ~/.local/state/cmux."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return Path(base) / "cmuxd"
    return Path.home() / ".local" / "state" / "cmux"


def front_socket_path(state_dir: str | Path) -> Path:
    """The socket on which `serve --stdio` hands its stdin and stdout to the daemon."""
    return Path(state_dir) / "front.sock"
