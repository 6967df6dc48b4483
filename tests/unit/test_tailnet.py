"""--allow-from lists and the tailscale: forms of --tcp, without touching the network."""

from __future__ import annotations

import shutil

import pytest

from cmuxd.config import Config
from cmuxd.supervisor.listeners import ListenerError, bind_tcp, parse_tcp
from cmuxd.tailnet import TCP_KEYWORDS, AllowList, TailnetError, interface_addresses, is_tailnet


@pytest.mark.parametrize("host", [
    "100.64.0.1", "100.101.102.103", "100.127.255.254", "fd7a:115c:a1e0::1",
    "fd7a:115c:a1e0:ab12:4843:cd96:626b:430b", "::ffff:100.88.14.7",
])
def test_tailnet_allows_tailnet_peers(host):
    assert AllowList.parse(["tailnet"]).allows(host)


@pytest.mark.parametrize("host", [
    "100.63.255.255", "100.128.0.1", "127.0.0.1", "::1", "192.168.77.10", "10.0.0.1",
    "fd7a:115c:a1e1::1", "::ffff:192.168.77.10", "not an address", "",
])
def test_tailnet_refuses_everything_else(host):
    assert not AllowList.parse(["tailnet"]).allows(host)


def test_entries_combine_across_flags_and_commas():
    allow = AllowList.parse(["tailnet,loopback", "192.168.77.0/24 10.1.2.3"])
    for host in ("100.64.0.9", "127.0.0.1", "::1", "192.168.77.200", "10.1.2.3",
                 "::ffff:127.0.0.1", "127.0.0.2"):
        assert allow.allows(host), host
    for host in ("10.1.2.4", "192.168.78.1", "fe80::1%eth0"):
        assert not allow.allows(host), host
    assert str(allow) == "tailnet, loopback, 192.168.77.0/24, 10.1.2.3"


def test_scoped_addresses_are_judged_without_their_scope():
    assert AllowList.parse(["fe80::/10"]).allows("fe80::1%eth0")


@pytest.mark.parametrize("bad", ["tailnets", "10.0.0.0/33", "300.1.1.1", "example.org"])
def test_a_bad_entry_is_a_sentence_naming_it(bad):
    with pytest.raises(TailnetError) as info:
        AllowList.parse([bad])
    message = str(info.value)
    assert repr(bad) in message and "CIDR" in message


def test_an_empty_list_is_refused():
    with pytest.raises(TailnetError, match="no network"):
        AllowList.parse([" , "])


def test_config_normalises_allow_from_once():
    config = Config(allow_from=["tailnet"], workers=1, state_dir="/tmp/x")
    assert config.allow is not None and config.allow.allows("100.64.1.1")
    assert Config(workers=1, state_dir="/tmp/x").allow is None
    with pytest.raises(ValueError):
        Config(allow_from=["nope"], workers=1, state_dir="/tmp/x")
    # The allow list is the supervisor's business; workers are not told.
    assert "allow" not in config.worker_json() and "allow_from" not in config.worker_json()


@pytest.mark.parametrize("spec,host", [("tailscale:5555", "tailscale"),
                                       ("tailscale4:5555", "tailscale4"),
                                       ("tailscale6:0", "tailscale6")])
def test_tailscale_forms_parse_as_keywords(spec, host):
    assert parse_tcp(spec)[0] == host and host in TCP_KEYWORDS


def test_no_tailnet_address_is_a_clear_error():
    if any(is_tailnet(a) for a in interface_addresses()) or shutil.which("tailscale"):
        pytest.skip("this host may have a tailnet address, so binding tailscale: could succeed")
    with pytest.raises(ListenerError) as info:
        bind_tcp("tailscale:0")
    message = str(info.value)
    assert message.startswith("--tcp tailscale:0: this host has no tailnet address")
    assert "100.64.0.0/10" in message and "--allow-from tailnet" in message


def test_launchd_tailnet_plist_binds_everything_and_lets_only_tailnet_peers_in(tmp_path):
    """launchd binds at load, before tailscaled is up: every address, filtered by cmuxd."""
    import plistlib

    from cmuxd import units

    plist = plistlib.loads(units.render_plist(["/x/cmuxd-remote"], tmp_path / "t",
                                              tmp_path / "s", tmp_path / "l", 5555,
                                              tailnet=True))
    assert plist["Sockets"]["tcp"] == {"SockServiceName": "5555", "SockType": "stream"}
    args = plist["ProgramArguments"]
    assert args[-2:] == ["--allow-from", "tailnet,loopback"]
    # What the daemon will make of that argument.
    allow = AllowList.parse([args[-1]])
    assert allow.allows("100.101.102.103") and allow.allows("::1")
    assert not allow.allows("192.168.1.20")
    plain = plistlib.loads(units.render_plist(["/x/cmuxd-remote"], tmp_path / "t",
                                              tmp_path / "s", tmp_path / "l", 5555))
    assert plain["Sockets"]["tcp"]["SockNodeName"] == "127.0.0.1"
    assert "--allow-from" not in plain["ProgramArguments"]
