"""The daemon's children (workers, PTY hub) never import from the directory the daemon was
started in: a module planted there must not run as the daemon's user, and a checkout there
must not shadow the installed package."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from helpers import wait_for
from listening import ListeningDaemon

REPO = Path(__file__).resolve().parents[2]


def children(daemon: ListeningDaemon, module: str = "") -> list[tuple[psutil.Process, str]]:
    """Living children running `module`, each with its working directory."""
    found = []
    for child in psutil.Process(daemon.proc.pid).children():
        try:
            if module in " ".join(child.cmdline()):
                found.append((child, child.cwd()))
        except psutil.Error:  # exited (a retired worker) or a zombie not yet reaped
            pass
    return found


def ping_ok(daemon: ListeningDaemon) -> None:
    stream = daemon.authed()
    assert stream.call("ping", id=1)["ok"] is True
    stream.close()


def pty_ok(daemon: ListeningDaemon) -> None:
    """The hub answers: a PTY session can be listed through a worker."""
    stream = daemon.authed()
    reply = stream.call("pty.list", id=1)
    assert reply["ok"] is True, reply
    stream.close()


@pytest.fixture
def planted(tmp_path):
    """A directory holding an `argparse.py` (imported by every child at start) that leaves
    a marker when it runs."""
    where = tmp_path / "planted"
    where.mkdir()
    marker = tmp_path / "imported"
    (where / "argparse.py").write_text(
        f"import os\nopen({str(marker)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        "raise ImportError('planted module')\n")
    return where, marker


def test_planted_module_is_never_imported_by_a_child(planted):
    where, marker = planted
    daemon = ListeningDaemon(cwd=where)
    try:
        daemon.wait_ready()
        ping_ok(daemon)
        pty_ok(daemon)
        # Every way a child is started again: reload, a killed worker, a killed hub.
        generation = daemon.status()["generation"]
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: daemon.status()["generation"] == generation + 1
                 and all(w["alive"] for w in daemon.status()["workers"]), timeout=15)
        victim = daemon.status()["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: all(w["alive"] and w["pid"] != victim
                             for w in daemon.status()["workers"]), timeout=15)
        # The reload also has the hub re-execute in place: its command line may be
        # unreadable for a moment.
        [(hub, _)] = wait_for(lambda: children(daemon, "cmuxd.hub_process"), timeout=15)
        hub.kill()
        wait_for(lambda: any(p.pid != hub.pid for p, _ in children(daemon, "cmuxd.hub_process")),
                 timeout=15)
        wait_for(lambda: daemon.authed().call("pty.list", id=1)["ok"] is True, timeout=15)
        ping_ok(daemon)
        assert {cwd for _, cwd in children(daemon)} == {"/"}
        assert not marker.exists(), f"planted module ran in pids {marker.read_text().split()}"
    finally:
        daemon.close()


def test_daemon_started_beside_a_checkout_serves(tmp_path):
    """A `--user` unit runs in ~, where the checkout often sits as ~/cmuxd: its directory
    must not be taken for the package."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "cmuxd").symlink_to(REPO)
    daemon = ListeningDaemon(cwd=home)
    try:
        daemon.wait_ready()
        ping_ok(daemon)
        pty_ok(daemon)
        assert "No module named" not in daemon.log()
    finally:
        daemon.close()


def test_daemon_started_in_the_checkout_serves():
    daemon = ListeningDaemon(cwd=REPO)
    try:
        daemon.wait_ready()
        ping_ok(daemon)
        pty_ok(daemon)
    finally:
        daemon.close()

