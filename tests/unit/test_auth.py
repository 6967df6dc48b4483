"""Relay auth (spec §7): the vectors of §7.8, scenarios 27-29 of §9 and the credentials lookup.

Both handshake roles are sans-IO, so every case runs by feeding bytes, with no socket and no
clock; the credentials lookup runs on real files in a temporary directory with env dicts.
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import os
import re
import stat
import traceback
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cmuxd.auth as auth
from cmuxd.auth import (
    BUSY_REPLY,
    FAILURE_REPLY,
    MAX_AUTH_LINE,
    AuthError,
    ClientHandshake,
    Credentials,
    ServerHandshake,
    client_credentials,
    client_mac,
    default_token_path,
    new_nonce,
    parse_token,
    read_token_file,
    relay_mac,
    server_credentials,
    write_new_token,
)

V1_TOKEN = bytes.fromhex("a1" * 32)
V1_MAC = "5f9c42acc8e201e538e9c5941f132326bcb3988af7dbea9b5b14c65d34afa309"
V3_TOKEN = bytes(range(32))
V3_ID = "relay-handshake-test"
V3_NONCE = "0123456789abcdef0123456789abcdef"
V3_MAC = "b57b07788277baa33a8be041a7769b429c3211f4ddbadd5c5daaa1fa26d68f7c"
V3_PROOF = "1f87b0d4e442fb20aaa77fad3b1ad53e2826223f821c6045f07f35c170d1a898"
P1_MAC = "087edb52f2191b4bc9e9b57ccd96be9f18cfd77d33a590c179ce15bf018380f3"
CLIENT_NONCE = "ab" * 32
SCENARIO_28_RELAY_MAC = "7df04898631b8b45ce2a5a0ac611b4d711effbfde9baa90cea30faf6c2234c5c"
PING = b'{"id":1,"method":"ping"}\n'

# A token whose hex text is easy to spot if it ever leaks into a message.
SECRET_HEX = "5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7"
SECRET = bytes.fromhex(SECRET_HEX)

REASONS = {"bad_json", "relay_id", "mac_format", "mac", "client_nonce", "too_long", "eof"}


def line(obj) -> bytes:
    return orjson.dumps(obj) + b"\n"


def v1_server() -> ServerHandshake:
    return ServerHandshake(V1_TOKEN, "relay-1", nonce="testnonce")


def assert_no_secret(text: str, *secrets: str) -> None:
    for s in (SECRET_HEX, SECRET_HEX.upper(), repr(SECRET), *secrets):
        assert s not in text


# ---------------------------------------------------------------------------------------------
# §7.8 vectors


@pytest.mark.parametrize(
    "token_hex, relay_id, nonce, expected",
    [
        ("a1" * 32, "relay-1", "testnonce", V1_MAC),
        ("b2" * 32, "relay-2", "testnonce",
         "2f7a8b0a0f0d335d086cd8aaa3c700cb10e52848faa82239dc4d5ba1de549355"),
        (V3_TOKEN.hex(), V3_ID, V3_NONCE, V3_MAC),
        ("a" * 64, "relay-ci", "nonce-ci",
         "72a8dc5bb74100a0f0464e77a3673bdfbd533e023145c02e91e2abb531662d55"),
    ],
    ids=["V1", "V2", "V3", "V4"],
)
def test_client_mac_vectors_and_server_accepts_them(token_hex, relay_id, nonce, expected):
    token = bytes.fromhex(token_hex)
    assert client_mac(token, relay_id, nonce) == expected
    server = ServerHandshake(token, relay_id, nonce=nonce)
    server.feed(line({"mac": expected, "relay_id": relay_id}))
    assert server.state == "accepted"
    assert server.reply == b'{"ok":true}\n'
    assert server.mutual is False


def test_relay_mac_vector_v3_proof():
    assert relay_mac(V3_TOKEN, V3_ID, CLIENT_NONCE, V3_NONCE) == V3_PROOF


def test_p1_is_what_the_token_text_as_key_gives_and_the_server_rejects_it():
    wrong = hmac.new(("a1" * 32).encode(), b"relay_id=relay-1\nnonce=testnonce\nversion=1",
                     hashlib.sha256).hexdigest()
    assert wrong == P1_MAC
    server = v1_server()
    server.feed(line({"mac": P1_MAC, "relay_id": "relay-1"}))
    assert server.state == "failed"
    assert server.reason == "mac"
    assert server.reply == FAILURE_REPLY


def test_v1_end_to_end_line_of_the_spec_is_accepted():
    server = v1_server()
    server.feed(b'{"mac":"5f9c42acc8e201e538e9c5941f132326bcb3988af7dbea9b5b14c65d34afa309",'
                b'"relay_id":"relay-1"}\n')
    assert server.state == "accepted"


# ---------------------------------------------------------------------------------------------
# §9 scenarios 27 and 28


def test_scenario_27_v1_client_then_rpc_bytes_are_kept():
    server = v1_server()
    assert server.challenge() == (
        b'{"protocol":"cmux-relay-auth","version":1,"relay_id":"relay-1","nonce":"testnonce"}\n'
    )
    assert server.state == "waiting" and server.reply is None
    server.feed(line({"mac": V1_MAC, "relay_id": "relay-1"}) + PING)
    assert server.state == "accepted"
    assert server.reply == b'{"ok":true}\n'
    assert server.leftover == PING
    assert server.mutual is False
    assert server.reason is None


def test_scenario_28_mutual_client_gets_relay_mac():
    server = v1_server()
    server.feed(b'{"client_nonce":"' + CLIENT_NONCE.encode() + b'","mac":"' + V1_MAC.encode()
                + b'","relay_id":"relay-1"}\n')
    assert server.state == "accepted"
    assert server.mutual is True
    assert server.reply == b'{"ok":true,"relay_mac":"' + SCENARIO_28_RELAY_MAC.encode() + b'"}\n'
    assert server.leftover == b""


def test_scenario_28_with_v3_credentials_gives_v3_proof():
    server = ServerHandshake(V3_TOKEN, V3_ID, nonce=V3_NONCE)
    server.feed(line({"client_nonce": CLIENT_NONCE, "mac": V3_MAC, "relay_id": V3_ID}))
    assert server.state == "accepted"
    assert orjson.loads(server.reply) == {"ok": True, "relay_mac": V3_PROOF}


def test_fresh_nonce_when_none_is_given():
    nonces = {new_nonce() for _ in range(50)}
    assert len(nonces) == 50
    assert all(re.fullmatch(r"[0-9a-f]{32}", n) for n in nonces)
    server = ServerHandshake(V1_TOKEN, "relay-1")
    sent = orjson.loads(server.challenge())
    assert re.fullmatch(r"[0-9a-f]{32}", sent["nonce"])
    server.feed(line({"mac": client_mac(V1_TOKEN, "relay-1", sent["nonce"]), "relay_id": "relay-1"}))
    assert server.state == "accepted"


# ---------------------------------------------------------------------------------------------
# §7.4 rule 3 and §9 scenario 29: every way the daemon says no


def auth_with(**fields) -> bytes:
    obj = {"mac": V1_MAC, "relay_id": "relay-1"}
    for key, value in fields.items():
        if value is DROP:
            obj.pop(key)
        else:
            obj[key] = value
    return line(obj)


DROP = object()

FAILURES = {
    "wrong mac (P1)": (auth_with(mac=P1_MAC), "mac"),
    "mac of another nonce (replay)": (auth_with(mac=client_mac(V1_TOKEN, "relay-1", "other")), "mac"),
    "wrong relay_id": (auth_with(relay_id="relay-2"), "relay_id"),
    "relay_id number": (auth_with(relay_id=1), "relay_id"),
    "relay_id missing": (auth_with(relay_id=DROP), "relay_id"),
    "client_nonce uppercase": (auth_with(client_nonce=CLIENT_NONCE.upper()), "client_nonce"),
    "client_nonce odd": (auth_with(client_nonce="a" * 33), "client_nonce"),
    "client_nonce 30 chars": (auth_with(client_nonce="ab" * 15), "client_nonce"),
    "client_nonce 130 chars": (auth_with(client_nonce="ab" * 65), "client_nonce"),
    "client_nonce null": (auth_with(client_nonce=None), "client_nonce"),
    "client_nonce empty": (auth_with(client_nonce=""), "client_nonce"),
    "client_nonce not hex": (auth_with(client_nonce="zz" * 32), "client_nonce"),
    "client_nonce number": (auth_with(client_nonce=12345678), "client_nonce"),
    "plain RPC request": (PING, "relay_id"),
    "array": (b'["mac","relay_id"]\n', "bad_json"),
    "string": (b'"hello"\n', "bad_json"),
    "number": (b"1\n", "bad_json"),
    "null": (b"null\n", "bad_json"),
    "not JSON": (b"hello\n", "bad_json"),
    "empty line": (b"\n", "bad_json"),
    "invalid UTF-8": (b'{"mac":"\xff","relay_id":"relay-1"}\n', "bad_json"),
    "mac not hex": (auth_with(mac="z" * 64), "mac_format"),
    "mac 63 digits": (auth_with(mac=V1_MAC[:63]), "mac_format"),
    "mac 65 digits": (auth_with(mac=V1_MAC + "0"), "mac_format"),
    "mac with spaces": (auth_with(mac=" " + V1_MAC[1:]), "mac_format"),
    "mac missing": (auth_with(mac=DROP), "mac_format"),
    "mac number": (auth_with(mac=5), "mac_format"),
}


@pytest.mark.parametrize("data, reason", FAILURES.values(), ids=FAILURES.keys())
def test_server_refuses(data, reason):
    server = v1_server()
    server.feed(data + PING)
    assert server.state == "failed"
    assert server.reply == FAILURE_REPLY
    assert server.reason == reason
    assert server.leftover == b""
    assert server.mutual is False


def test_reasons_are_fixed_words_without_secrets():
    for data, _ in FAILURES.values():
        server = ServerHandshake(SECRET, "relay-1", nonce="testnonce")
        server.feed(data)
        assert server.reason in REASONS
        assert_no_secret(server.reason, V1_MAC, P1_MAC)
        assert_no_secret(repr(server))


def test_uppercase_mac_is_the_same_mac():
    server = v1_server()
    server.feed(auth_with(mac=V1_MAC.upper()))
    assert server.state == "accepted"


def test_unknown_keys_are_ignored():
    server = v1_server()
    server.feed(auth_with(extra={"nested": [1, 2]}, version=99))
    assert server.state == "accepted"


def test_one_trailing_cr_is_stripped():
    server = v1_server()
    server.feed(auth_with()[:-1] + b"\r\n" + PING)
    assert server.state == "accepted"
    assert server.leftover == PING


def pad_to(total: int) -> bytes:
    """An accepted auth line of exactly `total` bytes including its LF."""
    base = auth_with(pad="")
    return auth_with(pad="x" * (total - len(base)))


def test_auth_line_of_exactly_16384_bytes_is_accepted():
    data = pad_to(MAX_AUTH_LINE)
    assert len(data) == MAX_AUTH_LINE
    server = v1_server()
    server.feed(data)
    assert server.state == "accepted"


def test_auth_line_of_16385_bytes_is_too_long():
    data = pad_to(MAX_AUTH_LINE + 1)
    assert len(data) == MAX_AUTH_LINE + 1
    server = v1_server()
    server.feed(data)
    assert server.state == "failed"
    assert server.reason == "too_long"


def test_16385_bytes_without_lf_fail():
    server = v1_server()
    server.feed(b"x" * (MAX_AUTH_LINE + 1))
    assert (server.state, server.reason, server.reply) == ("failed", "too_long", FAILURE_REPLY)


def test_bytes_without_lf_fail_once_no_line_could_fit_even_in_small_reads():
    server = v1_server()
    for _ in range(MAX_AUTH_LINE // 1024 - 1):
        server.feed(b"x" * 1024)
    server.feed(b"x" * 1023)
    assert server.state == "waiting"  # 16,383 bytes: the LF could still make it 16,384
    server.feed(b"x")
    assert (server.state, server.reason) == ("failed", "too_long")


def test_eof_before_a_whole_line_fails():
    server = v1_server()
    server.feed(auth_with()[:-1])
    server.eof()
    assert (server.state, server.reason, server.reply) == ("failed", "eof", FAILURE_REPLY)


def test_eof_after_acceptance_changes_nothing():
    server = v1_server()
    server.feed(auth_with())
    server.eof()
    assert server.state == "accepted"


def test_io_layer_failure_uses_the_same_reply():
    server = v1_server()
    server.fail("timeout")
    assert (server.state, server.reason, server.reply) == ("failed", "timeout", FAILURE_REPLY)
    server.feed(auth_with())
    assert server.state == "failed"
    accepted = v1_server()
    accepted.feed(auth_with())
    with pytest.raises(RuntimeError):
        accepted.fail("timeout")


def test_server_constructor_rejects_unusable_settings():
    with pytest.raises(ValueError):
        ServerHandshake(V1_TOKEN, "")
    with pytest.raises(ValueError):
        ServerHandshake(V1_TOKEN, "a\nb")
    with pytest.raises(ValueError):
        ServerHandshake(b"", "relay-1")
    with pytest.raises(TypeError):
        ServerHandshake("a1" * 32, "relay-1")  # the hex text is not the key (P1)


# ---------------------------------------------------------------------------------------------
# Leftover bytes: the RPC stream that follows the auth line must survive any read pattern


def test_leftover_when_fed_byte_by_byte():
    server = v1_server()
    data = auth_with(client_nonce=CLIENT_NONCE) + PING + PING
    for i in range(len(data)):
        server.feed(data[i : i + 1])
    assert server.state == "accepted"
    assert server.mutual is True
    assert server.leftover == PING + PING


def test_bytes_after_acceptance_join_leftover_and_after_failure_are_dropped():
    server = v1_server()
    server.feed(auth_with() + b'{"id":1,')
    server.feed(b'"method":"ping"}\n')
    assert server.leftover == PING
    failed = v1_server()
    failed.feed(auth_with(mac=P1_MAC))
    failed.feed(PING)
    assert failed.leftover == b""


@settings(max_examples=150, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
       tail=st.binary(max_size=200), mutual=st.booleans())
def test_any_split_gives_the_same_result(cuts, tail, mutual):
    extra = {"client_nonce": CLIENT_NONCE} if mutual else {}
    data = auth_with(**extra) + tail
    server = v1_server()
    start = 0
    for cut in sorted(c for c in cuts if c <= len(data)):
        server.feed(data[start:cut])
        start = cut
    server.feed(data[start:])
    assert server.state == "accepted"
    assert server.mutual is mutual
    assert server.leftover == tail


# ---------------------------------------------------------------------------------------------
# ClientHandshake, alone and against ServerHandshake


def run(client: ClientHandshake, server: ServerHandshake, after_reply: bytes = b"",
        pipelined: bytes = b"") -> None:
    """Carry bytes between the two roles the way the I/O layers do."""
    client.feed(server.challenge())
    if client.to_send is None:
        return
    sent, client.to_send = client.to_send, None
    server.feed(sent + pipelined)
    if server.reply is not None:
        client.feed(server.reply + (after_reply if server.state == "accepted" else b""))


def test_client_sends_the_scenario_28_line():
    client = ClientHandshake(V1_TOKEN, "relay-1", client_nonce=CLIENT_NONCE)
    assert client.state == "waiting_challenge" and client.to_send is None
    client.feed(v1_server().challenge())
    assert client.state == "sent"
    # The scenario's line, plus the §6.8 key that lets our daemon say it is busy.
    assert client.to_send.endswith(b"\n")
    assert orjson.loads(client.to_send) == {
        "client_nonce": CLIENT_NONCE, "ext_busy": True, "mac": V1_MAC, "relay_id": "relay-1"}
    client.to_send = None
    client.feed(b'{"ok":true,"relay_mac":"' + SCENARIO_28_RELAY_MAC.encode() + b'"}\n' + PING)
    assert client.state == "accepted"
    assert client.error is None
    assert client.leftover == PING


def test_client_and_server_end_to_end_mutual():
    client = ClientHandshake(SECRET, "fleet-a")
    server = ServerHandshake(SECRET, "fleet-a")
    run(client, server, after_reply=b'{"id":1,"ok":true}\n', pipelined=PING)
    assert server.state == "accepted" and server.mutual is True
    assert server.leftover == PING
    assert client.state == "accepted"
    assert client.leftover == b'{"id":1,"ok":true}\n'
    assert len(client.client_nonce) == 64


def test_client_and_server_end_to_end_byte_by_byte():
    client = ClientHandshake(V3_TOKEN, V3_ID, client_nonce=CLIENT_NONCE)
    server = ServerHandshake(V3_TOKEN, V3_ID, nonce=V3_NONCE)
    for b in server.challenge():
        client.feed(bytes([b]))
    sent, client.to_send = client.to_send, None
    for b in sent:
        server.feed(bytes([b]))
    assert orjson.loads(server.reply)["relay_mac"] == V3_PROOF
    for b in server.reply + PING:
        client.feed(bytes([b]))
    assert client.state == "accepted"
    assert client.leftover == PING


def test_v1_client_line_and_mutual_client_agree_on_the_server():
    # A v1 client (no client_nonce) and our mutual client pass the same server check.
    v1 = v1_server()
    v1.feed(line({"mac": V1_MAC, "relay_id": "relay-1"}))
    mutual = v1_server()
    client = ClientHandshake(V1_TOKEN, "relay-1")
    run(client, mutual)
    assert (v1.state, v1.mutual, mutual.state, mutual.mutual) == ("accepted", False, "accepted", True)
    assert client.state == "accepted"


def test_client_with_the_wrong_token_is_refused():
    client = ClientHandshake(SECRET, "relay-1")
    server = ServerHandshake(V1_TOKEN, "relay-1")
    run(client, server)
    assert server.state == "failed" and server.reason == "mac"
    assert client.state == "failed"
    assert client.error == auth.ERROR_REFUSED
    assert_no_secret(client.error)


@pytest.mark.parametrize("reply", [
    {"ok": True, "relay_mac": "00" * 32},
    {"ok": True, "relay_mac": P1_MAC},
    {"ok": True, "relay_mac": V1_MAC},  # the client's own MAC echoed back proves nothing
    {"ok": True},
    {"ok": True, "relay_mac": None},
    {"ok": True, "relay_mac": SCENARIO_28_RELAY_MAC[:63]},
    # The proof for another client nonce must not be replayable.
    {"ok": True, "relay_mac": relay_mac(V1_TOKEN, "relay-1", "cd" * 32, "testnonce")},
])
def test_client_refuses_a_server_without_proof(reply):
    client = ClientHandshake(V1_TOKEN, "relay-1", client_nonce=CLIENT_NONCE)
    client.feed(v1_server().challenge())
    client.to_send = None
    client.feed(line(reply) + PING)
    assert client.state == "failed"
    assert client.error == auth.ERROR_NO_PROOF
    assert client.leftover == b""
    assert client.to_send is None


def test_client_accepts_an_uppercase_relay_mac():
    client = ClientHandshake(V1_TOKEN, "relay-1", client_nonce=CLIENT_NONCE)
    client.feed(v1_server().challenge())
    client.feed(line({"ok": True, "relay_mac": SCENARIO_28_RELAY_MAC.upper()}))
    assert client.state == "accepted"


@pytest.mark.parametrize("reply", [{"ok": False}, {"ok": "true"}, {}, {"ok": 1}])
def test_client_reports_refusal(reply):
    client = ClientHandshake(V1_TOKEN, "relay-1")
    client.feed(v1_server().challenge())
    client.feed(line(reply))
    assert client.state == "failed"
    assert client.error == auth.ERROR_REFUSED


@pytest.mark.parametrize("mac", [V1_MAC, "00" * 32, "not a mac"])
@pytest.mark.parametrize("extra, reply", [
    ({"ext_busy": True}, BUSY_REPLY),
    ({"ext_device": "x"}, BUSY_REPLY),  # any ext_ key of its own announces our client (§6.8)
    ({}, FAILURE_REPLY),  # an upstream client sees the ordinary failure
    ({"busy": True}, FAILURE_REPLY),
])
def test_a_handshake_without_room_says_nothing_of_the_credentials(mac, extra, reply):
    """Right, wrong and malformed MACs get the same bytes: `ext_busy` is no oracle."""
    server = v1_server()
    server.busy()
    server.feed(line({"mac": mac, "relay_id": "relay-1", **extra}))
    assert (server.state, server.reason, server.reply) == ("failed", "capacity", reply)


def test_a_handshake_without_room_refuses_an_unreadable_line_plainly():
    server = v1_server()
    server.busy()
    server.feed(b'{"ext_busy": tr\n')
    assert (server.state, server.reply) == ("failed", FAILURE_REPLY)


def test_our_client_tells_a_busy_daemon_from_refused_credentials():
    client = ClientHandshake(V1_TOKEN, "relay-1")
    server = v1_server()
    server.busy()
    run(client, server)
    assert server.reply == BUSY_REPLY
    assert client.state == "unavailable"
    assert client.error == auth.ERROR_BUSY and "try again" in client.error


@pytest.mark.parametrize("reply", [{"ok": False, "ext_busy": "true"}, {"ok": False, "ext_busy": 1},
                                   {"ok": True, "ext_busy": True}])
def test_client_takes_only_a_literal_ext_busy_failure_as_busy(reply):
    client = ClientHandshake(V1_TOKEN, "relay-1", client_nonce=CLIENT_NONCE)
    client.feed(v1_server().challenge())
    client.feed(line(reply))
    assert client.state == "failed"
    assert client.error in (auth.ERROR_REFUSED, auth.ERROR_NO_PROOF)


CHALLENGE = {"protocol": "cmux-relay-auth", "version": 1, "relay_id": "relay-1",
             "nonce": "testnonce"}


@pytest.mark.parametrize("change", [
    {"relay_id": "relay-2"},
    {"relay_id": None},
    {"protocol": "something-else"},
    {"protocol": None},
    {"version": 2},
    {"version": "1"},
    {"version": True},
    {"version": 1.0},
    {"nonce": ""},
    {"nonce": None},
    {"nonce": 7},
], ids=repr)
def test_challenge_mismatch_sends_nothing(change):
    challenge = {k: v for k, v in {**CHALLENGE, **change}.items() if v is not None}
    client = ClientHandshake(V1_TOKEN, "relay-1")
    client.feed(line(challenge))
    assert client.state == "failed"
    assert client.to_send is None
    assert client.error.startswith("relay auth challenge mismatch")


def test_a_daemon_at_its_limit_is_unavailable_not_an_auth_failure():
    client = ClientHandshake(V1_TOKEN, "relay-1")
    client.feed(line({"ok": False, "error": {"code": "unavailable",
                                              "message": "at its limit of 3 connections"}}))
    assert client.state == "unavailable"
    assert client.to_send is None
    assert client.error == "the daemon is not taking connections now: at its limit of 3 connections"


@pytest.mark.parametrize("reply", [{"ok": False}, {"ok": False, "error": "x"},
                                   {"ok": False, "error": {"message": 7}}], ids=repr)
def test_a_refusal_without_a_message_first_is_a_challenge_mismatch(reply):
    client = ClientHandshake(V1_TOKEN, "relay-1")
    client.feed(line(reply))
    assert client.state == "failed"
    assert client.error.startswith("relay auth challenge mismatch")


@pytest.mark.parametrize("data", [PING, b"SSH-2.0-OpenSSH_9.6\r\n", b"[]\n", b"x" * MAX_AUTH_LINE])
def test_a_server_that_is_not_a_relay_is_a_challenge_mismatch(data):
    client = ClientHandshake(V1_TOKEN, "relay-1")
    client.feed(data)
    assert client.state == "failed"
    assert client.to_send is None
    assert client.error.startswith("relay auth challenge mismatch")


def test_client_against_a_server_for_another_relay_id():
    client = ClientHandshake(V1_TOKEN, "relay-1")
    server = ServerHandshake(V1_TOKEN, "relay-2")
    run(client, server)
    assert client.state == "failed" and client.to_send is None
    assert "'relay-2'" in client.error and "'relay-1'" in client.error
    assert server.state == "waiting"  # nothing was sent to it


def test_client_accepts_any_non_empty_nonce():
    client = ClientHandshake(V1_TOKEN, "relay-1")
    client.feed(line({**CHALLENGE, "nonce": "not hex at all ✓"}))
    assert client.state == "sent"


def test_client_eof():
    waiting = ClientHandshake(V1_TOKEN, "relay-1")
    waiting.eof()
    assert waiting.state == "failed"
    assert waiting.error.startswith("relay auth challenge mismatch")
    sent = ClientHandshake(V1_TOKEN, "relay-1")
    sent.feed(line(CHALLENGE))
    sent.eof()
    assert sent.state == "failed" and sent.to_send is None
    assert "closed the connection" in sent.error


def test_client_constructor_rejects_a_malformed_client_nonce():
    for bad in ("AB" * 32, "ab" * 15, "a" * 33, "ab" * 65):
        with pytest.raises(ValueError):
            ClientHandshake(V1_TOKEN, "relay-1", client_nonce=bad)


@settings(max_examples=100, deadline=None)
@given(token=st.binary(min_size=16, max_size=64),
       relay_id=st.text(min_size=1, max_size=40).filter(lambda s: "\n" not in s),
       nonce=st.text(min_size=1, max_size=40))
def test_round_trip_for_any_credentials(token, relay_id, nonce):
    client = ClientHandshake(token, relay_id)
    server = ServerHandshake(token, relay_id, nonce=nonce)
    run(client, server, pipelined=PING)
    assert server.state == "accepted" and server.leftover == PING
    assert client.state == "accepted"


# ---------------------------------------------------------------------------------------------
# Credentials


def write_secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def auth_json(relay_id: str | None = "fleet-a", token: str = SECRET_HEX) -> str:
    obj = {"relay_token": token}
    if relay_id is not None:
        obj["relay_id"] = relay_id
    return orjson.dumps(obj).decode()


@pytest.fixture
def home(tmp_path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def env(home) -> dict:
    return {"HOME": str(home)}


def test_parse_token_accepts_hex_with_whitespace_and_either_case():
    assert parse_token(f"  {SECRET_HEX}\n") == SECRET
    assert parse_token(SECRET_HEX.upper()) == SECRET
    assert parse_token("00" * 16) == bytes(16)


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("   \n", "empty"),
    (SECRET_HEX[:-1], "odd"),
    (SECRET_HEX[:-2] + "zz", "not a hex"),
    (SECRET_HEX[:30] + " " + SECRET_HEX[30:], "not a hex"),
    ("00" * 15, "at least 16"),
])
def test_parse_token_errors_say_what_to_do_and_hide_the_text(text, words):
    with pytest.raises(AuthError) as err:
        parse_token(text, source="CMUX_RELAY_TOKEN")
    msg = str(err.value)
    assert words in msg
    assert "CMUX_RELAY_TOKEN" in msg
    assert "cmuxd-remote token new" in msg or "copy it again" in msg
    assert_no_secret(msg)
    if text.strip():
        assert text.strip() not in msg


def test_read_token_file_hex_line_and_json(tmp_path):
    assert read_token_file(write_secret(tmp_path / "t", SECRET_HEX + "\n")) == SECRET
    assert read_token_file(write_secret(tmp_path / "j", auth_json())) == SECRET
    assert read_token_file(str(write_secret(tmp_path / "k", auth_json(None)))) == SECRET


@pytest.mark.parametrize("mode, words", [
    (0o644, "can be read by other users"),
    (0o640, "can be read by other users"),
    (0o604, "can be read by other users"),
    (0o620, "can be changed by other users"),
    (0o666, "can be read and changed by other users"),
])
def test_read_token_file_refuses_loose_modes(tmp_path, mode, words):
    path = write_secret(tmp_path / "relay-token", SECRET_HEX, mode)
    with pytest.raises(AuthError) as err:
        read_token_file(path)
    msg = str(err.value)
    assert words in msg
    assert f"run chmod 600 {path}" in msg
    assert_no_secret(msg)


def test_read_token_file_allows_owner_only_modes(tmp_path):
    for mode in (0o400, 0o600, 0o700):
        assert read_token_file(write_secret(tmp_path / f"t{mode:o}", SECRET_HEX, mode)) == SECRET


def test_missing_token_file_says_how_to_create_one(tmp_path):
    with pytest.raises(AuthError) as err:
        read_token_file(tmp_path / "nope")
    assert "cmuxd-remote token new" in str(err.value)
    assert str(tmp_path / "nope") in str(err.value)


def test_a_directory_is_not_a_token_file(tmp_path):
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(AuthError, match="not a regular file"):
        read_token_file(d)


@pytest.mark.parametrize("text", [
    '{"relay_token": "' + SECRET_HEX + '", ',  # cut short
    '{"relay_id": "x", "token": "' + SECRET_HEX + '"}',  # wrong key
    '{"relay_id": "x", "relay_token": "' + SECRET_HEX[:-1] + '"}',  # odd
    '{"relay_id": 5, "relay_token": "' + SECRET_HEX + '"}',
    '{"relay_id": "", "relay_token": "' + SECRET_HEX + '"}',
    SECRET_HEX + "zz",
])
def test_malformed_token_files_never_echo_the_token(tmp_path, text):
    path = write_secret(tmp_path / "bad", text)
    with pytest.raises(AuthError) as err:
        read_token_file(path)
    msg = str(err.value)
    assert str(path) in msg
    # The whole traceback, chained exceptions included, is what a log would show.
    shown = "".join(traceback.format_exception(err.value))
    assert_no_secret(shown, SECRET_HEX[:-1])


def test_default_token_path(home):
    assert default_token_path({"HOME": str(home)}) == home / ".config" / "cmuxd" / "relay-token"
    assert default_token_path({"HOME": str(home), "XDG_CONFIG_HOME": "/etc/xdg-here"}) == Path(
        "/etc/xdg-here/cmuxd/relay-token")
    # A relative XDG_CONFIG_HOME is invalid per the XDG spec and is ignored.
    assert default_token_path({"HOME": str(home), "XDG_CONFIG_HOME": "rel"}) == (
        home / ".config" / "cmuxd" / "relay-token")


def test_write_new_token_creates_a_private_file(tmp_path):
    path = tmp_path / "cfg" / "cmuxd" / "relay-token"
    old_umask = os.umask(0o022)
    try:
        assert write_new_token(path) == path
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert re.fullmatch(r"[0-9a-f]{64}\n", path.read_text())
    assert len(read_token_file(path)) == 32


def test_write_new_token_refuses_to_overwrite_unless_forced(tmp_path):
    path = write_new_token(tmp_path / "relay-token")
    first = path.read_text()
    with pytest.raises(AuthError, match="already exists") as err:
        write_new_token(path)
    assert first.strip() not in str(err.value)
    assert path.read_text() == first
    write_new_token(path, force=True)
    assert path.read_text() != first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["relay-token"]


def test_write_new_token_defaults_to_the_default_path(env, home):
    path = write_new_token(env=env)
    assert path == home / ".config" / "cmuxd" / "relay-token"
    assert len(read_token_file(path)) == 32


# server_credentials ---------------------------------------------------------------------------

OTHER_HEX = "0f" * 32


def test_server_token_order(tmp_path, env, home):
    default = write_secret(default_token_path(env), "11" * 32)
    creds_dir = tmp_path / "creds"
    write_secret(creds_dir / "relay-token", "22" * 32, 0o440)  # as systemd leaves it
    flag_file = write_secret(tmp_path / "flag", "33" * 32)
    full = {**env, "CREDENTIALS_DIRECTORY": str(creds_dir), "CMUX_RELAY_TOKEN": " " + "44" * 32}

    assert server_credentials(flag_file, env=full).token == bytes.fromhex("33" * 32)
    got = server_credentials(env=full)
    assert got.token == bytes.fromhex("22" * 32)
    assert "systemd credential" in got.source
    got = server_credentials(env={**env, "CMUX_RELAY_TOKEN": "44" * 32,
                                  "CREDENTIALS_DIRECTORY": str(tmp_path / "empty")})
    assert got.token == bytes.fromhex("44" * 32)
    assert got.source.startswith("token from CMUX_RELAY_TOKEN")
    got = server_credentials(env={**env, "CMUX_RELAY_TOKEN": "  "})
    assert got.token == bytes.fromhex("11" * 32)
    assert str(default) in got.source


def test_server_relay_id_order(tmp_path, env):
    plain = write_secret(tmp_path / "plain", SECRET_HEX)
    json_file = write_secret(tmp_path / "json", auth_json("from-file"))
    with_env = {**env, "CMUX_RELAY_ID": " from-env "}
    assert server_credentials(plain, relay_id="from-flag", env=with_env).relay_id == "from-flag"
    # The file's relay id belongs with its token, as for a client given the same file.
    assert server_credentials(json_file, env=with_env).relay_id == "from-file"
    assert client_credentials(None, json_file, env=with_env).relay_id == "from-file"
    assert server_credentials(plain, env=with_env).relay_id == "from-env"
    host = server_credentials(plain, env=env)
    assert host.relay_id == os.uname().nodename.split(".")[0]
    assert "." not in host.relay_id
    assert "host name" in host.source


def test_server_without_any_token_says_how_to_make_one(env):
    with pytest.raises(AuthError) as err:
        server_credentials(env=env)
    msg = str(err.value)
    assert "cmuxd-remote token new" in msg
    assert str(default_token_path(env)) in msg


def test_server_refuses_a_loose_default_file_and_a_bad_env_token(env):
    write_secret(default_token_path(env), SECRET_HEX, 0o644)
    with pytest.raises(AuthError, match="chmod 600"):
        server_credentials(env=env)
    with pytest.raises(AuthError) as err:
        server_credentials(env={**env, "CMUX_RELAY_TOKEN": SECRET_HEX[:-1]})
    assert "CMUX_RELAY_TOKEN" in str(err.value)
    assert_no_secret(str(err.value), SECRET_HEX[:-1])


def test_server_refuses_an_empty_relay_id(tmp_path, env):
    plain = write_secret(tmp_path / "plain", SECRET_HEX)
    with pytest.raises(AuthError, match="--relay-id"):
        server_credentials(plain, relay_id="  ", env=env)


# client_credentials ---------------------------------------------------------------------------


def test_client_env_pair_comes_before_files(env, home):
    write_secret(home / ".cmux" / "relay" / "5555.auth", auth_json("from-auth-file", OTHER_HEX))
    got = client_credentials(5555, env={**env, "CMUX_RELAY_ID": " env-id ",
                                        "CMUX_RELAY_TOKEN": f" {SECRET_HEX}\n"})
    assert (got.relay_id, got.token) == ("env-id", SECRET)
    assert got.source == "CMUX_RELAY_ID and CMUX_RELAY_TOKEN"


@pytest.mark.parametrize("half", [{"CMUX_RELAY_ID": "env-id"}, {"CMUX_RELAY_TOKEN": SECRET_HEX},
                                  {"CMUX_RELAY_ID": " ", "CMUX_RELAY_TOKEN": SECRET_HEX}])
def test_client_env_pair_is_used_only_when_both_are_set(env, home, half):
    write_secret(home / ".cmux" / "relay" / "5555.auth", auth_json("from-auth-file", OTHER_HEX))
    got = client_credentials(5555, env={**env, **half})
    assert (got.relay_id, got.token) == ("from-auth-file", bytes.fromhex(OTHER_HEX))


def test_client_token_file_flag_wins_over_everything(tmp_path, env):
    flag = write_secret(tmp_path / "fleet.json", auth_json("from-flag-file"))
    full = {**env, "CMUX_RELAY_ID": "env-id", "CMUX_RELAY_TOKEN": OTHER_HEX}
    got = client_credentials(5555, token_file=flag, env=full)
    assert (got.relay_id, got.token) == ("from-flag-file", SECRET)
    assert client_credentials(5555, token_file=flag, relay_id="flag-id", env=full).relay_id == "flag-id"


def test_client_plain_token_file_takes_the_relay_id_from_flag_or_env(tmp_path, env):
    plain = write_secret(tmp_path / "plain", SECRET_HEX)
    assert client_credentials(None, token_file=plain, relay_id="flag-id", env=env).relay_id == "flag-id"
    assert client_credentials(None, token_file=plain,
                              env={**env, "CMUX_RELAY_ID": "env-id"}).relay_id == "env-id"
    with pytest.raises(AuthError, match="--relay-id"):
        client_credentials(None, token_file=plain, env=env)
    with pytest.raises(AuthError, match="--relay-id"):
        client_credentials(None, token_file=plain, relay_id=" ", env=env)


def test_client_port_auth_file(env, home):
    path = write_secret(home / ".cmux" / "relay" / "5555.auth", auth_json("relay-7"))
    got = client_credentials(5555, env=env)
    assert (got.relay_id, got.token) == ("relay-7", SECRET)
    assert str(path) in got.source
    path.chmod(0o644)
    with pytest.raises(AuthError, match="chmod 600"):
        client_credentials(5555, env=env)


def test_client_default_file_with_relay_id_from_flag_or_env(env):
    write_secret(default_token_path(env), SECRET_HEX)
    assert client_credentials(5555, relay_id="flag-id", env=env).relay_id == "flag-id"
    got = client_credentials(5555, env={**env, "CMUX_RELAY_ID": "env-id"})
    assert (got.relay_id, got.token) == ("env-id", SECRET)
    with pytest.raises(AuthError, match="CMUX_RELAY_ID"):
        client_credentials(5555, env=env)


def test_client_without_credentials_says_what_to_do(env, home):
    write_secret(home / ".cmux" / "relay" / "6666.auth", auth_json())  # another port's file
    with pytest.raises(AuthError) as err:
        client_credentials(5555, env=env)
    msg = str(err.value)
    assert msg.startswith("no relay credentials for this address; ")
    assert "CMUX_RELAY_TOKEN" in msg and "--token-file" in msg


def test_credentials_never_show_the_token(tmp_path, env):
    creds = [
        Credentials("relay-1", SECRET, "test"),
        server_credentials(write_secret(tmp_path / "t", SECRET_HEX), relay_id="r", env=env),
        client_credentials(None, env={**env, "CMUX_RELAY_ID": "r", "CMUX_RELAY_TOKEN": SECRET_HEX}),
    ]
    for c in creds:
        assert c.token == SECRET
        for text in (repr(c), str(c), f"{c}", c.source, repr([c])):
            assert_no_secret(text)
        assert "32 bytes" in repr(c)


def test_auth_py_imports_no_io_module():
    tree = ast.parse(Path(auth.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    forbidden = {"socket", "asyncio", "selectors", "subprocess", "multiprocessing", "threading",
                 "ssl", "signal"}
    assert not imported & forbidden


def test_rotate_token_file_keeps_the_json_form_and_relay_id(tmp_path):
    from cmuxd.auth import rotate_token_file

    path = tmp_path / "relay-token"
    path.write_text(json.dumps({"relay_id": "fleet", "relay_token": "ab" * 32}))
    path.chmod(0o600)
    token = rotate_token_file(path)
    assert json.loads(path.read_text()) == {"relay_id": "fleet", "relay_token": token.hex()}
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["relay-token"]  # no temporary left


def test_rotate_token_file_keeps_a_hex_line_and_its_owner(tmp_path):
    from cmuxd.auth import rotate_token_file

    path = tmp_path / "relay-token"
    path.write_text("cd" * 32 + "\n")
    path.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(path, 0, 65534)  # a group of its own: kept, like the owner
    token = rotate_token_file(path)
    assert path.read_text() == token.hex() + "\n"
    st = os.stat(path)
    assert st.st_mode & 0o777 == 0o600
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (0, 65534)


@pytest.mark.parametrize("content, mode, message", [
    ("cd" * 32, 0o640, "chmod 600"),
    ("not a token", 0o600, "not a hex string"),
    (None, 0o600, "does not exist"),
])
def test_rotate_token_file_refuses_what_token_new_would(tmp_path, content, mode, message):
    from cmuxd.auth import AuthError, rotate_token_file

    path = tmp_path / "relay-token"
    if content is not None:
        path.write_text(content)
        path.chmod(mode)
    with pytest.raises(AuthError, match=message):
        rotate_token_file(path)
    assert content is None or path.read_text() == content
