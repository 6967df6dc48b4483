"""`ssh://` addresses and the ssh command line they become."""

from __future__ import annotations

import pytest

from cmuxd.attach import exit_code_of
from cmuxd.client import EXIT_USAGE, Address, ClientError, parse_address
from cmuxd.ssh_transport import ssh_argv


@pytest.mark.parametrize("text, address", [
    ("ssh://honey", Address("ssh", host="honey")),
    ("ssh://me@honey:2222", Address("ssh", host="honey", port=2222, user="me")),
    ("ssh://me@[::1]:22", Address("ssh", host="::1", port=22, user="me")),
    ("ssh://a@b@honey", Address("ssh", host="honey", user="a@b")),
    ("ssh://-oProxyCommand=x", Address("ssh", host="-oProxyCommand=x")),
])
def test_ssh_addresses_parse(text, address):
    parsed = parse_address(text)
    assert parsed == address and parsed.user == address.user
    assert str(parsed) == text


@pytest.mark.parametrize("text, said", [
    ("ssh://", "no host"),
    ("ssh://@honey", "no user before the @"),
    ("ssh://honey:0", "between 1 and 65535"),
    ("ssh://honey:ssh", "must be a number"),
    ("ssh://honey/tmp", "ssh://[user@]host[:port]"),
])
def test_bad_ssh_addresses_are_usage_errors(text, said):
    with pytest.raises(ClientError) as caught:
        parse_address(text)
    assert caught.value.exit_code == EXIT_USAGE and said in str(caught.value)


def test_the_destination_always_follows_the_end_of_options():
    argv = ssh_argv("-oProxyCommand=x", "-l", 2222, "/opt/cmuxd/bin/cmuxd-remote")
    assert argv == ["ssh", "-T", "-p", "2222", "--", "-l@-oProxyCommand=x",
                    "/opt/cmuxd/bin/cmuxd-remote serve --stdio"]
    assert ssh_argv("honey") == ["ssh", "-T", "--", "honey", "cmuxd-remote serve --stdio"]


@pytest.mark.parametrize("status, code, words", [
    ({"code": 3}, 3, "exited with 3"),
    ({"signal": 9}, 137, "killed by SIGKILL"),
    ({}, 0, "ended"),
    # What a daemon sends is checked: nonsense is an ending with no status.
    ({"code": "3"}, 0, "ended"),
    ({"code": 4096}, 0, "ended"),
    ({"signal": -1}, 0, "ended"),
    ({"signal": True}, 0, "ended"),
])
def test_exit_status_becomes_a_shell_exit_code(status, code, words):
    assert exit_code_of(status) == (code, words)
