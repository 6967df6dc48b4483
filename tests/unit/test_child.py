"""The supervisor's handle on one process, against real processes: its exit seen through a
pidfd, a child adopted by pid, a process that is not our child, SIGABRT before SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

from cmuxd.supervisor.child import UNKNOWN_STATUS, Child

HUNG = ("import faulthandler, sys; faulthandler.enable(); sys.stdout.write('up\\n'); "
        "sys.stdout.flush()\nwhile True: pass")


async def exit_of(child: Child, timeout: float = 30) -> int:
    ended = asyncio.get_running_loop().create_future()
    child.watch(lambda c: ended.set_result(c.returncode))
    return await asyncio.wait_for(ended, timeout)


def test_the_exit_of_a_started_child_is_an_event():
    async def main():
        child = Child.start([sys.executable, "-c", "import sys; sys.exit(3)"])
        assert await exit_of(child) == 3
        assert not child.alive

    asyncio.run(main())


def test_a_child_known_only_by_its_pid_is_reaped_with_its_status():
    """As after a re-exec: the process is ours, no Popen object is."""
    async def main():
        pid = os.posix_spawn(sys.executable, [sys.executable, "-c", "import os; os._exit(7)"],
                             os.environ)
        child = Child(pid)
        assert await exit_of(child) == 7
        assert child.poll() == 7
        try:
            os.waitpid(pid, os.WNOHANG)
            raise AssertionError("the child was not reaped")
        except ChildProcessError:
            pass

    asyncio.run(main())


def test_a_process_that_is_not_our_child_is_watched_and_signalled():
    async def main():
        shell = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
                               capture_output=True, check=True)
        child = Child(int(shell.stdout), ours=False)
        assert child.alive
        child.kill()
        assert await exit_of(child) == UNKNOWN_STATUS

    asyncio.run(main())


def test_a_hung_child_gets_sigabrt_and_its_traceback_reaches_its_stderr():
    async def main():
        child = Child.start([sys.executable, "-c", HUNG], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
        assert child._popen.stdout.readline() == b"up\n"
        child.abort()
        code = await exit_of(child)
        return code, child._popen.stderr.read().decode()

    code, err = asyncio.run(main())
    assert code == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in err and "<string>" in err


def test_a_child_that_cannot_take_sigabrt_gets_sigkill():
    async def main():
        child = Child.start([sys.executable, "-c", HUNG], stdout=subprocess.PIPE)
        assert child._popen.stdout.readline() == b"up\n"
        os.kill(child.pid, signal.SIGSTOP)  # SIGABRT stays pending: only SIGKILL ends it
        child.abort()
        return await exit_of(child)

    assert asyncio.run(main()) == -signal.SIGKILL


def test_signals_to_a_process_that_ended_go_nowhere():
    async def main():
        child = Child.start([sys.executable, "-c", "pass"])
        await exit_of(child)
        child.kill()
        child.abort()
        child.send_signal(signal.SIGTERM)
        assert child.wait() == 0

    asyncio.run(main())
