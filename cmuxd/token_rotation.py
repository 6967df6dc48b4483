"""`token rotate`: a new relay token in the daemon's token file and in the running daemon,
with no restart.

The daemon is asked first: with none running nothing is rotated (`token new --force` is the
way to replace the token of a stopped daemon), so this command never leaves a file and a
daemon that disagree without saying so. The new token reaches the daemon over its control
socket, which answers only its own user and root, and never through argv or a log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .auth import AuthError, rotate_token_file
from .status import control_request


class RotationError(Exception):
    """The token could not be rotated, or only half of it was; the message says what to do.
    `exit_code` is 3 when no daemon answers, as for the other client commands."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Rotation:
    path: Path
    previous_until: float | None  # wall clock; None: the old token is refused already


def rotate(control_path: Path, path: str | None, grace: float) -> Rotation:
    try:
        status = control_request(control_path, {"method": "status"})
    except OSError as exc:
        raise RotationError(f"{exc} The token was not rotated; to replace the token of a "
                            "stopped daemon, run `cmuxd-remote token new --force PATH`", 3) from None
    target = Path(path) if path is not None else _daemon_file(status)
    daemon_file = status.get("token_file")
    if daemon_file and os.path.realpath(target) != os.path.realpath(daemon_file):
        raise RotationError(f"the daemon reads its token from {daemon_file}, not {target}; "
                            f"run `cmuxd-remote token rotate {daemon_file}`")
    try:
        token = rotate_token_file(target)
    except AuthError as exc:
        raise RotationError(f"{exc}; the token was not rotated") from None
    try:
        result = control_request(control_path, {"method": "rotate_token", "token": token.hex(),
                                                "grace": grace})
    except OSError as exc:
        raise RotationError(f"{target} holds the new token, but the running daemon did not take "
                            f"it: {exc}; restart the daemon so that it reads the file") from None
    return Rotation(target, result.get("previous_token_until"))


def _daemon_file(status: dict) -> Path:
    """The file to rewrite when none is named: the daemon's own, when it reads one."""
    origin = status.get("token_origin")
    if status.get("token_file"):
        return Path(status["token_file"])
    if origin is None:
        raise RotationError("the daemon runs without a relay token (it serves only Unix sockets "
                            "with the peer uid check); there is nothing to rotate")
    where = ("its unit's LoadCredential= file, e.g. /etc/cmuxd/relay-token"
             if origin == "systemd credential" else "the file its clients read")
    raise RotationError(f"the daemon takes its token from {origin}, which cannot be rewritten; "
                        f"name the file to write the new token to: {where}")
