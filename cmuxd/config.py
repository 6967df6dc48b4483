"""One object that holds every daemon option, normalised once.

The CLI builds it, the supervisor reads it, and the part a worker needs travels to the
worker as JSON (`worker_json`): never the token, which only the supervisor holds.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .paths import front_socket_path, runtime_dir
from .tailnet import AllowList

DEFAULT_PORT = 5555


@dataclass
class Config:
    tcp: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)
    workers: int = 0
    token_file: str | None = None
    relay_id: str | None = None
    unix_auth: str = "peer"  # "peer": same uid or root, no token; "token": relay handshake too
    devices_only: bool = False  # TCP takes device keys only, not the shared token
    max_handshakes: int = 256
    backoff_failures: int = 20
    backoff_window: float = 60.0
    backoff_max: float = 60.0
    max_connections: int = 10000
    max_connections_served: int = 0  # recycle a worker after this many (0: never)
    max_worker_rss: int = 0  # MiB; recycle a worker above it (0: never)
    worker_timeout: float = 10.0  # seconds without a heartbeat answer before a kill
    graceful_timeout: float = 30.0  # how long retiring workers may keep old connections
    shell: str | None = None
    scrollback: int = 1 << 20
    idle_ttl: float = 86400.0
    cli_bridge: bool = True  # a CLI bridge socket per PTY session (spec §6.7)
    state_dir: str = ""
    external_hub: bool = False
    """PTY sessions are owned by a hub another unit runs: adopt it, never start one."""
    allow_from: list[str] = field(default_factory=list)  # --allow-from; empty: every peer
    # The shared library that exports launch_activate_socket(3); None: the process's own
    # (libSystem on macOS, where launchd is asked whatever this says).
    launchd_library: str | None = None
    allow: AllowList | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.workers <= 0:
            self.workers = os.cpu_count() or 1
        if not self.state_dir:
            self.state_dir = str(runtime_dir())
        if self.scrollback <= 0 or self.idle_ttl <= 0:
            raise ValueError("--scrollback and --idle-ttl must be positive")
        if self.max_handshakes < 1:
            raise ValueError("--max-handshakes must be at least 1")
        if self.unix_auth not in ("peer", "token"):
            raise ValueError("--unix-auth must be 'peer' or 'token'")
        if self.allow_from:
            self.allow = AllowList.parse(self.allow_from)

    @property
    def control_path(self) -> Path:
        return Path(self.state_dir) / "control.sock"

    @property
    def front_path(self) -> Path:
        return front_socket_path(self.state_dir)

    def worker_json(self) -> dict:
        keys = ("shell", "scrollback", "idle_ttl", "state_dir", "cli_bridge")
        data = asdict(self)
        return {k: data[k] for k in keys}
