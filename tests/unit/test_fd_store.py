"""What a hub takes back from the service manager's fd store at start (cmuxd.fd_store): a
whole session is adopted; a torn or hostile entry is refused and dropped, and every fd it
came with is closed. Each case runs in a child process whose fds 3… and LISTEN_* variables
are what systemd would hand it. The whole path, with systemd 252 and a SIGKILL of the hub,
is in tests/system/test_systemd.py."""

import json
import os
import subprocess
import sys

import orjson

from cmuxd.fd_store import process_start, store_address

CHILD = r"""
import json, os, stat, sys
from cmuxd.fd_store import take_stored
sources = json.loads(sys.argv[1])
for i, fd in enumerate(sources):
    os.dup2(fd, 3 + i)
os.environ["LISTEN_PID"] = str(os.getpid()) if sys.argv[3] == "self" else "1"
os.environ["LISTEN_FDS"] = str(len(sources))
os.environ["LISTEN_FDNAMES"] = sys.argv[2]
sessions, broken = take_stored()
def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
open_fds = [fd for fd in range(3, 3 + len(sources)) if is_open(fd)]
print(json.dumps({
    "sessions": [{"meta": meta, "master_is_chr": stat.S_ISCHR(os.fstat(m).st_mode),
                  "ring": r} for meta, m, r in sessions],
    "broken": broken,
    "env": [k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ],
    "open": open_fds,
}))
"""


def memfd(data: bytes) -> int:
    fd = os.memfd_create("test", 0)
    os.write(fd, data)
    return fd


def meta(**over) -> bytes:
    base = {"session_id": "s1", "pid": os.getpid(), "start": process_start(os.getpid()),
            "command": "sh", "script": None, "cli_path": None}
    base.update(over)
    return orjson.dumps(base)


def take(fds: list[int], names: list[str], pid: str = "self") -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(fds), ":".join(names), pid],
                         pass_fds=fds, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def session_fds(meta_bytes: bytes = None) -> tuple[list[int], list[str]]:
    master, slave = os.openpty()
    os.close(slave)
    return ([master, memfd(b"ring"), memfd(meta_bytes if meta_bytes is not None else meta())],
            ["abc.master", "abc.ring", "abc.meta"])


def test_a_whole_session_is_handed_back_and_its_description_closed():
    fds, names = session_fds()
    got = take(fds, names)
    assert got["broken"] == []
    [session] = got["sessions"]
    assert session["meta"]["session_id"] == "s1" and session["master_is_chr"]
    # master and ring are kept for the hub; the description's fd is closed once read
    assert got["open"] == [3, 4]
    assert got["env"] == []


def test_an_entry_without_its_master_is_dropped_and_its_fds_closed():
    fds, names = session_fds()
    got = take(fds[1:], names[1:])
    assert got["sessions"] == [] and got["broken"] == ["abc"]
    assert got["open"] == []


def test_a_description_that_is_not_json_or_lacks_fields_is_dropped():
    for bad in (b"\xff not json", b"[]", meta(pid="1"), meta(session_id=7)):
        fds, names = session_fds(bad)
        got = take(fds, names)
        assert got["sessions"] == [] and got["broken"] == ["abc"], bad
        assert got["open"] == []


def test_a_master_that_is_not_a_terminal_is_refused():
    fds, names = session_fds()
    r, w = os.pipe()
    fds[0] = r
    got = take(fds, names)
    assert got["sessions"] == [] and got["broken"] == ["abc"]


def test_fds_under_names_it_did_not_store_are_closed():
    fds, names = session_fds()
    extra = memfd(b"x")
    got = take(fds + [extra], names + ["unknown"])
    assert len(got["sessions"]) == 1
    assert got["open"] == [3, 4]


def test_variables_meant_for_another_process_adopt_nothing_and_are_removed():
    fds, names = session_fds()
    got = take(fds, names, pid="other")
    assert got["sessions"] == [] and got["broken"] == []
    assert got["env"] == []


def test_names_that_do_not_match_the_count_adopt_nothing():
    fds, names = session_fds()
    got = take(fds, names[:2])
    assert got["sessions"] == []
    assert got["open"] == []


def test_the_notify_socket_is_taken_out_of_the_environment():
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "OTHER": "1"}
    assert store_address(env) == "/run/systemd/notify" and "NOTIFY_SOCKET" not in env
    env = {"NOTIFY_SOCKET": "@abstract"}
    assert store_address(env) == "\0abstract"
    assert store_address({"NOTIFY_SOCKET": "relative"}) is None
    assert store_address({}) is None
