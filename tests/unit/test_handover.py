"""The state the supervisor hands to its next image across exec: its checks, its memfd, and
the pre-flight's view of it with the secrets replaced."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import orjson
import pytest

from cmuxd.supervisor import handover
from cmuxd.supervisor.handover import HandoverError, check_state, redacted, take_state

TOKEN = "ab" * 32
OLD = "cd" * 32


def listener(fd: int = 3) -> dict:
    return {"fd": fd, "kind": "tcp", "address": "127.0.0.1:5555", "origin": "bound",
            "path": None, "name": "", "inode": None}


def worker() -> dict:
    return {"index": 0, "generation": 1, "pid": 4242, "chan": 9, "started": 1.5,
            "state": "serving", "retire_reason": "", "load": 2, "served": 7, "serve_limit": 0,
            "ready": True, "version": "1.0", "ping_seq": 3, "devices": {}, "inbuf": "",
            "out": [["eyJ0IjoicGluZyJ9Cg==", None], ["eA==", 12]],
            "unacked": [[5, 12, "eA=="]]}


def state() -> dict:
    return {
        "format": handover.FORMAT, "version": "1.0", "listeners": [listener()],
        "front": listener(4), "control": listener(5),
        "creds": {"relay_id": "r", "token": TOKEN, "source": "file", "path": None,
                  "origin": "file"},
        "secret_env": {"CMUX_RELAY_TOKEN": TOKEN},
        "rotation": {"replaced_token": OLD, "previous": OLD, "previous_for": 30.0,
                     "previous_until": 1e9},
        "counters": {"accepted": 3}, "started": 1.0, "next_id": 4, "notify": {},
        "last_used": {},
        "pool": {"generation": 1, "workers_wanted": 1, "crash_streak": 0,
                 "workers": [worker()]},
        "hub": {"pid": None, "spawned_at": 0.0, "streak": 0, "upgrading": False},
    }


def test_a_whole_state_passes():
    check_state(state())


def with_change(path: tuple, value) -> dict:
    s = copy.deepcopy(state())
    at = s
    for key in path[:-1]:
        at = at[key]
    if value is KeyError:
        del at[path[-1]]
    else:
        at[path[-1]] = value
    return s


@pytest.mark.parametrize("path, value, message", [
    (("format",), 99, "format 99"),
    (("format",), "1", "no format number"),
    (("listeners",), KeyError, "state.listeners is missing"),
    (("listeners",), {}, "state.listeners has the wrong type"),
    (("listeners", 0, "fd"), "3", r"state.listeners\[0\].fd has the wrong type"),
    (("front",), [], "state.front has the wrong type"),
    (("control", "inode"), "x", "state.control.inode has the wrong type"),
    (("creds", "token"), "not hex", "state.creds.token is not a hex token"),
    (("rotation", "previous"), "zz", "state.rotation.previous is not a hex token"),
    (("rotation", "previous_for"), True, "previous_for has the wrong type"),
    (("pool", "workers", 0, "chan"), 1.5, r"workers\[0\].chan has the wrong type"),
    (("pool", "workers", 0, "out"), [["eA==", "12"]], r"out has a malformed entry"),
    (("pool", "workers", 0, "out"), [["eA=="]], r"out has a malformed entry"),
    (("pool", "workers", 0, "unacked"), [[5, None, "eA=="]], "unacked has a malformed entry"),
    (("pool", "workers", 0), [], r"workers\[0\] is not an object"),
    (("hub", "pid"), "1", "state.hub.pid has the wrong type"),
    (("secret_env", "CMUX_RELAY_TOKEN"), 5, "secret_env.CMUX_RELAY_TOKEN has the wrong type"),
])
def test_a_state_it_cannot_adopt_is_refused_by_name_never_by_value(path, value, message):
    with pytest.raises(HandoverError, match=message) as caught:
        check_state(with_change(path, value))
    assert TOKEN not in str(caught.value) and OLD not in str(caught.value)


def test_a_state_that_is_not_an_object_is_refused():
    with pytest.raises(HandoverError, match="no format number"):
        check_state([1])


def test_redaction_replaces_every_token_and_keeps_the_shape():
    copy_ = redacted(state())
    text = orjson.dumps(copy_).decode()
    assert TOKEN not in text and OLD not in text
    check_state(copy_)
    assert state()["creds"]["token"] == TOKEN  # the original is untouched


def test_the_memfd_carries_the_state_to_the_next_image():
    fd = handover.write_state(state())
    assert os.get_inheritable(fd)
    env = {handover.FD_ENV: str(fd)}
    assert take_state(env) == state()
    assert env == {}  # no child started later inherits the variable
    with pytest.raises(OSError):
        os.fstat(fd)  # read once and closed


def test_no_variable_means_a_plain_start():
    assert take_state({}) is None


@pytest.mark.parametrize("make", [
    lambda: "x",
    lambda: "999999",
    lambda: str(handover.write_state({"format": 1})),
])
def test_a_handover_that_cannot_be_read_or_adopted_is_an_error(make):
    with pytest.raises(HandoverError):
        take_state({handover.FD_ENV: make()})


def test_not_json_in_the_memfd_is_an_error():
    r, w = os.pipe()
    os.write(w, b"{not json")
    os.close(w)
    with pytest.raises(HandoverError, match="does not name a readable"):
        take_state({handover.FD_ENV: str(r)})


@pytest.mark.parametrize("data, status, said", [
    (orjson.dumps(redacted(state())), 0, ""),
    (b"[", 1, "the handover state is not JSON"),
    (orjson.dumps(dict(state(), format=2)), 1, "cannot adopt the supervisor's state"),
])
def test_the_pre_flight_check_runs_in_a_fresh_interpreter(data, status, said):
    out = subprocess.run([sys.executable, "-P", "-m", "cmuxd.supervisor.handover"], input=data,
                         capture_output=True, cwd="/")
    assert out.returncode == status
    assert said in out.stderr.decode()
