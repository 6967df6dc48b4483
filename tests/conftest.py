import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import StdioDaemon  # noqa: E402


@pytest.fixture
def spawn_daemon():
    """Start `serve --stdio` children; every one started is killed at the end of the test."""
    started: list[StdioDaemon] = []

    def spawn(*args: str, **kwargs) -> StdioDaemon:
        daemon = StdioDaemon(*args, **kwargs)
        started.append(daemon)
        return daemon

    yield spawn
    for daemon in started:
        daemon.close()


@pytest.fixture
def daemon(spawn_daemon) -> StdioDaemon:
    """A fresh stdio daemon (one connection)."""
    return spawn_daemon()


@pytest.fixture
def spawn_listening():
    """Start listening daemons (`serve --tcp/--socket`), each ready; all stopped at the end."""
    from listening import ListeningDaemon

    started: list[ListeningDaemon] = []

    def spawn(*extra: str, **kwargs) -> ListeningDaemon:
        d = ListeningDaemon(*extra, **kwargs)
        started.append(d)
        return d.wait_ready()

    yield spawn
    for d in started:
        d.close()


@pytest.fixture(scope="session")
def other_user() -> tuple[int, int]:
    """(uid, gid) of a real local user other than us: `nobody`, else one made with useradd."""
    import pwd
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("needs root, to act as a second local user")
    for name in ("nobody", "cmuxd-test-other"):
        try:
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "cmuxd-test-other"], check=True)
    entry = pwd.getpwnam("cmuxd-test-other")
    return entry.pw_uid, entry.pw_gid
