"""A token given as CMUX_RELAY_TOKEN is readable from no daemon process's
/proc/<pid>/environ (nor argv), nor from a PTY shell's, and still authenticates, also after a
reload."""

from __future__ import annotations

import signal
import sys

import psutil
import pytest

from helpers import wait_for
from listening import ListeningDaemon

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")


def exposed(pid: int, token: str) -> list[str]:
    """Where the token shows in what /proc tells about a process."""
    found = []
    for name in ("environ", "cmdline"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                if token.encode() in f.read():
                    found.append(f"{pid}/{name}")
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def tree(pid: int) -> list[int]:
    return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]


def test_token_from_the_environment_is_not_left_in_proc():
    d = ListeningDaemon(token_in_env=True, workers=2).wait_ready()
    try:
        stream = d.authed()
        assert stream.call("ping", id=1)["ok"] is True
        reply = stream.call("pty.attach", {
            "session_id": "s", "attachment_id": "a", "client_attachment_token": "t",
            "cols": 80, "rows": 24, "command": "exec sleep 600"})
        assert reply["ok"], reply
        wait_for(lambda: any("sleep" in p.name() for p in
                             psutil.Process(d.proc.pid).children(recursive=True)))
        pids = tree(d.proc.pid)
        assert len(pids) >= 4  # supervisor, two workers, the hub, the shell
        assert [where for pid in pids for where in exposed(pid, d.token)] == []
        assert d.token not in d.log()

        generation = d.status()["generation"]
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: d.status()["generation"] == generation + 1
                 and all(w["alive"] for w in d.status()["workers"]), timeout=15)
        assert d.authed().call("ping", id=2)["ok"] is True
        assert [where for pid in tree(d.proc.pid) for where in exposed(pid, d.token)] == []
    finally:
        d.close()


def test_a_token_too_long_for_the_environment_handoff_is_refused_with_a_sentence():
    d = ListeningDaemon(workers=1, env={"CMUX_RELAY_TOKEN": "ab" * 40000})
    try:
        assert d.proc.wait(30) == 1
        assert "CMUX_RELAY_TOKEN is far too long" in d.log()
    finally:
        d.close()
