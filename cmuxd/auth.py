"""Relay authentication (spec §7), both roles, and the one place that knows where credentials live.

The handshakes are sans-IO state machines in the style of h11: they are fed bytes and hand
back bytes, and never touch a socket, a loop or a clock. The I/O layer owns the timing rules
(the 5 s pre-auth deadline, the 50 ms floor before a failure reply) because only it has a
clock; keeping them out of here is what lets every vector and failure case of the spec be
checked without a network. The credentials lookup reads files, so it uses os/pathlib, and
nothing else here does.

Secrets never leave this module in text: exception messages, failure reasons, `repr` and
`source` strings name where a token came from, never the token or a MAC.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

MAX_AUTH_LINE = 16384
"""Largest auth line, counted with its LF (§7.4 rule 2)."""

PREAUTH_TIMEOUT = 5.0
"""Seconds from accept to a complete auth line; enforced by the I/O layer."""

FAILURE_DELAY = 0.05
"""Seconds after the challenge before a failure reply may be sent; enforced by the I/O layer."""

PROTOCOL_NAME = "cmux-relay-auth"
VERSION = 1

OK_REPLY = b'{"ok":true}\n'
FAILURE_REPLY = b'{"ok":false}\n'
BUSY_REPLY = b'{"ok":false,"ext_busy":true}\n'
"""A capacity refusal, for an auth line that carries an `ext_` key of its own (§6.8)."""

TOKEN_FILE_NAME = "relay-token"
MIN_TOKEN_BYTES = 16
_MAX_TOKEN_FILE = 65536

_PROOF_LABEL = "cmux-relay-server-proof"
_CLIENT_NONCE = re.compile(r"(?:[0-9a-f]{2}){16,64}")
_HEX = re.compile(r"[0-9a-fA-F]*")


class AuthError(Exception):
    """Credentials are missing, unsafe or malformed, or a handshake failed.

    The message is a sentence for people and never contains a token or a MAC.
    """


class NoRelayIdError(AuthError):
    """A token was found but nothing names the relay id; the client may know why better."""


def new_nonce() -> str:
    """A fresh server nonce: 16 CSPRNG bytes as 32 lowercase hex characters (§7.2)."""
    return secrets.token_hex(16)


def _hmac_hex(token: bytes, message: str) -> str:
    # The one-shot form: no HMAC object per call, which the gate pays twice per connection.
    return hmac.digest(token, message.encode("utf-8"), "sha256").hex()


def client_mac(token: bytes, relay_id: str, server_nonce: str, version: int = VERSION) -> str:
    """The client's proof (§7.3). `token` is the decoded key, never the hex text (vector P1)."""
    return _hmac_hex(token, f"relay_id={relay_id}\nnonce={server_nonce}\nversion={version}")


def relay_mac(
    token: bytes, relay_id: str, client_nonce: str, server_nonce: str, version: int = VERSION
) -> str:
    """The relay's proof to a mutual client (§7.3); binds both nonces so it cannot be replayed."""
    return _hmac_hex(
        token,
        f"{_PROOF_LABEL}\nrelay_id={relay_id}\nclient_nonce={client_nonce}"
        f"\nserver_nonce={server_nonce}\nversion={version}",
    )


def fingerprint(key: Ed25519PublicKey) -> str:
    """A public key's name for people and logs, in ssh's form: SHA256:<base64, no padding>."""
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def device_transcript(relay_id: str, server_nonce: str, client_nonce: str, host_fp: str,
                      device: str, version: int = VERSION) -> bytes:
    """What a device signs instead of the token's MAC (README, device keys): both nonces make
    it good for one handshake only, the host key's fingerprint for one host only, `device`
    (the device key's fingerprint) for one authorized key only."""
    return (f"cmux-device-auth\nrelay_id={relay_id}\nserver_nonce={server_nonce}"
            f"\nclient_nonce={client_nonce}\nversion={version}\nhost_key={host_fp}"
            f"\ndevice={device}").encode("utf-8")


_HOST_PROOF_LABEL = b"cmux-device-host-proof\n"
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def _decode_sig(value: object) -> bytes | None:
    if type(value) is not str or len(value) > 100:
        return None
    try:
        sig = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return sig if len(sig) == 64 else None


def _verify(key: Ed25519PublicKey, sig: bytes, message: bytes) -> bool:
    try:
        key.verify(sig, message)
    except InvalidSignature:
        return False
    return True


def _decode_mac(value: object) -> bytes | None:
    """Decoded MAC bytes, or None: the spec asks for 64 hex digits, and comparing decoded bytes
    means letter case cannot turn a right MAC into a wrong one."""
    if type(value) is not str or len(value) != 64 or not _HEX.fullmatch(value):
        return None
    return bytes.fromhex(value)


def _valid_client_nonce(value: object) -> bool:
    return type(value) is str and _CLIENT_NONCE.fullmatch(value) is not None


def _check_relay_id(relay_id: str) -> None:
    # A LF inside the relay id would make two different (id, nonce) pairs sign the same text.
    if type(relay_id) is not str or not relay_id or "\n" in relay_id:
        raise ValueError("the relay id must be a non-empty string on one line")


def _take_line(buf: bytearray, data: bytes) -> tuple[bytes | None, bytes, bool]:
    """Append `data` to `buf` and cut one LF-terminated line out of it.

    Returns (line without LF and one trailing CR, bytes after it, too_long). Only the new data
    is searched for the LF, so byte-by-byte feeding stays linear.
    """
    cut = data.find(b"\n")
    if cut < 0:
        buf += data
        # A line already this long cannot end within the limit once its LF arrives.
        return None, b"", len(buf) >= MAX_AUTH_LINE
    if len(buf) + cut + 1 > MAX_AUTH_LINE:
        return None, b"", True
    line = bytes(buf) + data[:cut]
    buf.clear()
    if line.endswith(b"\r"):
        line = line[:-1]
    return line, data[cut + 1 :], False


def _load_object(line: bytes) -> dict | None:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return obj if type(obj) is dict else None


class ServerHandshake:
    """Daemon (relay) side of one connection's handshake.

    `state` goes from "waiting" to "accepted" or "failed" exactly once; `reply` is then the
    line to send. `reason` is a short fixed word for logs ("bad_json", "relay_id",
    "mac_format", "mac", "client_nonce", "too_long", "eof", or whatever the I/O layer passed
    to `fail`); it is never derived from what the peer sent, so it can be logged as is.
    """

    __slots__ = (
        "_tokens", "relay_id", "nonce", "_expected", "_buf",
        "state", "reply", "leftover", "mutual", "reason", "_busy",
        "_devices", "_host_key", "_host_fp", "_token_allowed", "device", "device_fp",
    )

    def __init__(self, token: bytes, relay_id: str, nonce: str | None = None,
                 previous: bytes | None = None, *,
                 devices: Mapping[str, tuple[str, Ed25519PublicKey]] | None = None,
                 host_key: Ed25519PrivateKey | None = None, host_fp: str = "",
                 token_allowed: bool = True):
        """`previous` is a token replaced by `token rotate` and still in its grace period:
        it is accepted too, and the relay proves itself with whichever token the client used.

        With a `host_key` (and its fingerprint `host_fp`), the challenge announces device
        keys and an authorized device of `devices` (its key's fingerprint -> (name, key)) may
        sign the transcript instead of sending a MAC; `token_allowed` False refuses the token (`--devices-only`). After acceptance
        `device` names the device, or is None for the token; after a failure of a device
        that is authorized, `device_fp` is its fingerprint, for the aggregated log."""
        _check_relay_id(relay_id)
        if not token:
            raise ValueError("the relay token must not be empty")
        self._tokens = (bytes(token),) if not previous else (bytes(token), bytes(previous))
        self.relay_id = relay_id
        # Fixing the nonce is for the spec's vectors only; the daemon always passes None.
        self.nonce = new_nonce() if nonce is None else nonce
        self._expected = [bytes.fromhex(client_mac(t, relay_id, self.nonce))
                          for t in self._tokens]
        self._buf = bytearray()
        self.state = "waiting"
        self.reply: bytes | None = None
        self.leftover = b""
        self.mutual = False
        self.reason: str | None = None
        self._busy = False
        self._devices = devices or {}
        self._host_key = host_key
        self._host_fp = host_fp
        self._token_allowed = token_allowed
        self.device: str | None = None
        self.device_fp: str | None = None

    def __repr__(self) -> str:
        return f"<ServerHandshake relay_id={self.relay_id!r} state={self.state}>"

    def challenge(self) -> bytes:
        msg = {"protocol": PROTOCOL_NAME, "version": VERSION, "relay_id": self.relay_id,
               "nonce": self.nonce}
        if self._host_key is not None:
            msg["ext_device_keys"] = self._host_fp
        return orjson.dumps(msg, option=orjson.OPT_APPEND_NEWLINE)

    def feed(self, data: bytes) -> None:
        """Take bytes from the client. Bytes arriving after acceptance join `leftover`, since
        they are RPC bytes; after a failure they are dropped, as rule 4 asks."""
        if self.state == "accepted":
            self.leftover += data
            return
        if self.state != "waiting":
            return
        line, rest, too_long = _take_line(self._buf, data)
        if too_long:
            self.fail("too_long")
        elif line is not None:
            self._decide(line, rest)

    def eof(self) -> None:
        """The client closed before a whole auth line: a failure, not a wait."""
        if self.state == "waiting":
            self.fail("eof")

    def fail(self, reason: str) -> None:
        """Fail for a reason only the I/O layer sees (timeout, capacity), so that the reply
        bytes stay defined in one place."""
        if self.state == "accepted":
            raise RuntimeError("the handshake already succeeded; close the connection instead")
        self.state = "failed"
        self.reply = FAILURE_REPLY
        self.reason = reason
        self.leftover = b""
        self._buf = bytearray()

    def busy(self) -> None:
        """The I/O layer has no room left for this handshake: its auth line, when it comes,
        is refused for capacity without its MAC being checked, so the reply (`ext_busy` or
        not) depends only on what the client announced and says nothing of its credentials."""
        self._busy = True

    def _decide(self, line: bytes, rest: bytes) -> None:
        msg = _load_object(line)
        if self._busy:
            self.fail("capacity")
            if msg is not None and any(type(k) is str and k.startswith("ext_") for k in msg):
                self.reply = BUSY_REPLY
            return
        if msg is None:
            return self.fail("bad_json")
        got_id = msg.get("relay_id")
        if type(got_id) is not str or got_id != self.relay_id:
            return self.fail("relay_id")
        if "ext_device" in msg:
            return self._decide_device(msg, rest)
        if not self._token_allowed:
            return self.fail("devices_only")
        mac = _decode_mac(msg.get("mac"))
        if mac is None:
            return self.fail("mac_format")
        mutual = "client_nonce" in msg
        client_nonce = msg.get("client_nonce")
        if mutual and not _valid_client_nonce(client_nonce):
            return self.fail("client_nonce")
        # Every token is compared, so the time taken does not say which one matched.
        matched = [hmac.compare_digest(mac, expected) for expected in self._expected]
        if not any(matched):
            return self.fail("mac")
        self.state = "accepted"
        self.mutual = mutual
        self.leftover = rest
        if mutual:
            token = self._tokens[matched.index(True)]
            proof = relay_mac(token, self.relay_id, client_nonce, self.nonce)
            self.reply = orjson.dumps(
                {"ok": True, "relay_mac": proof}, option=orjson.OPT_APPEND_NEWLINE
            )
        else:
            self.reply = OK_REPLY


    def _decide_device(self, msg: dict, rest: bytes) -> None:
        fp = msg.get("ext_device")
        client_nonce = msg.get("client_nonce")
        if self._host_key is None:
            return self.fail("device_off")
        if type(fp) is not str or not _FINGERPRINT.fullmatch(fp):
            return self.fail("device_format")
        if not _valid_client_nonce(client_nonce):
            return self.fail("client_nonce")
        entry = self._devices.get(fp)
        if entry is None:
            return self.fail("device_unknown")
        name, key = entry
        self.device_fp = fp
        sig = _decode_sig(msg.get("ext_device_sig"))
        transcript = device_transcript(self.relay_id, self.nonce, client_nonce, self._host_fp,
                                       fp)
        if sig is None or not _verify(key, sig, transcript):
            return self.fail("device_sig")
        self.state = "accepted"
        self.mutual = True
        self.device = name
        self.leftover = rest
        proof = self._host_key.sign(_HOST_PROOF_LABEL + transcript)
        self.reply = orjson.dumps({"ok": True, "ext_host_sig": base64.b64encode(proof).decode()},
                                  option=orjson.OPT_APPEND_NEWLINE)


@dataclass(frozen=True)
class DeviceCredential:
    """A device's own key and the host key it pinned for the daemon it dials."""

    key: Ed25519PrivateKey = field(repr=False)
    host_key: Ed25519PublicKey = field(repr=False)


_MISMATCH = "relay auth challenge mismatch: "
_NOT_A_RELAY = "check that the address is a cmuxd TCP listener"
ERROR_REFUSED = (
    "the relay refused the credentials; make sure the relay id and token are the ones the "
    "daemon at this address was started with"
)
ERROR_BUSY = (
    "the daemon is busy: it has as many handshakes in flight as it takes (--max-handshakes), "
    "perhaps because someone is flooding it; try again in a moment"
)
ERROR_DEVICE_REFUSED = (
    "the daemon refused this device's key; check that it was added on the host "
    "(`cmuxd-remote device list` there) and not revoked"
)
ERROR_NO_HOST_PROOF = (
    "the daemon did not prove it holds the host key pinned with `device trust`; do not use "
    "this address until you have checked that it points at your daemon"
)
ERROR_NO_PROOF = (
    "the relay did not prove it holds the relay token; do not use this address until you "
    "have checked that it points at your daemon and that your token is current"
)


class ClientHandshake:
    """Client side of the handshake; always mutual, so the daemon must prove it has the token.

    After `feed` has seen the challenge, `to_send` holds the auth line; the caller writes it
    and clears the attribute. A failed handshake never sets `to_send`, so nothing reaches a
    server that did not match (§7.5). `error` is a sentence for people.
    """

    __slots__ = (
        "_token", "relay_id", "client_nonce", "server_nonce", "_buf",
        "state", "to_send", "error", "leftover", "_device", "_transcript",
    )

    def __init__(self, token: bytes, relay_id: str, client_nonce: str | None = None,
                 device: DeviceCredential | None = None):
        """With `device`, the device key signs the handshake instead of the token's MAC, and
        the daemon must prove it holds the pinned host key."""
        _check_relay_id(relay_id)
        if not token and device is None:
            raise ValueError("the relay token must not be empty")
        if client_nonce is None:
            client_nonce = secrets.token_hex(32)
        elif not _valid_client_nonce(client_nonce):
            raise ValueError("client_nonce must be 32-128 lowercase hex characters of even length")
        self._token = bytes(token)
        self.relay_id = relay_id
        self.client_nonce = client_nonce
        self.server_nonce: str | None = None
        self._buf = bytearray()
        self.state = "waiting_challenge"
        self.to_send: bytes | None = None
        self.error: str | None = None
        self.leftover = b""
        self._device = device
        self._transcript = b""

    def __repr__(self) -> str:
        return f"<ClientHandshake relay_id={self.relay_id!r} state={self.state}>"

    def feed(self, data: bytes) -> None:
        if self.state == "accepted":
            self.leftover += data
            return
        while self.state in ("waiting_challenge", "sent"):
            line, rest, too_long = _take_line(self._buf, data)
            if too_long:
                if self.state == "waiting_challenge":
                    return self._fail(_MISMATCH + "the server sent an overlong line; " + _NOT_A_RELAY)
                return self._fail("the relay sent an overlong reply; " + _NOT_A_RELAY)
            if line is None:
                return
            if self.state == "waiting_challenge":
                self._on_challenge(line)
            else:
                self._on_reply(line, rest)
                return
            data = rest

    def eof(self) -> None:
        """The server closed before finishing the handshake."""
        if self.state == "waiting_challenge":
            self._fail(_MISMATCH + "the server closed the connection without a challenge; "
                       + _NOT_A_RELAY + ", and that its --allow-from admits this host (after "
                       "repeated failed handshakes it also refuses a host for a while)")
        elif self.state == "sent":
            self._fail("the relay closed the connection before answering the auth line; "
                       "check the daemon's log for the reason")

    def _fail(self, error: str) -> None:
        self.state = "failed"
        self.error = error
        self.to_send = None
        self.leftover = b""
        self._buf = bytearray()

    def _on_challenge(self, line: bytes) -> None:
        msg = _load_object(line)
        refusal = msg.get("error") if msg is not None and msg.get("ok") is False else None
        if type(refusal) is dict and type(refusal.get("message")) is str:
            # The daemon is at a limit and says so instead of challenging: not an auth error.
            self._fail(f"the daemon is not taking connections now: {refusal['message']:.300}")
            self.state = "unavailable"
            return
        if msg is None or msg.get("protocol") != PROTOCOL_NAME:
            return self._fail(_MISMATCH + "the server did not send a cmux relay challenge; "
                              + _NOT_A_RELAY)
        version = msg.get("version")
        if type(version) is not int or version != VERSION:
            return self._fail(_MISMATCH + f"the server speaks relay auth version {version!r:.20}"
                              f" and this client speaks only {VERSION}; upgrade the older side")
        got_id = msg.get("relay_id")
        if got_id != self.relay_id:
            # The relay id is public (it is in every challenge), so naming it is safe.
            return self._fail(_MISMATCH + f"the server is relay {got_id!r:.80}, not "
                              f"{self.relay_id!r:.80}; check the address, or use the relay id "
                              "the daemon was started with")
        nonce = msg.get("nonce")
        if type(nonce) is not str or not nonce:
            return self._fail(_MISMATCH + "the challenge has no nonce; " + _NOT_A_RELAY)
        self.server_nonce = nonce
        if self._device is not None:
            return self._sign_challenge(msg.get("ext_device_keys"))
        self.to_send = orjson.dumps(
            {"client_nonce": self.client_nonce,
             "ext_busy": True,  # §6.8: tell a capacity refusal from wrong credentials
             "mac": client_mac(self._token, self.relay_id, nonce),
             "relay_id": self.relay_id},
            option=orjson.OPT_APPEND_NEWLINE,
        )
        self.state = "sent"

    def _sign_challenge(self, announced: object) -> None:
        device = self._device
        pinned = fingerprint(device.host_key)
        if type(announced) is not str:
            return self._fail("the daemon at this address does not take device keys (its "
                              "challenge has no ext_device_keys); upgrade it, or connect with "
                              "the relay token (--token-file)")
        if announced != pinned:
            # Refused before anything is signed for it: this may be someone else's daemon.
            return self._fail(f"the daemon's host key is {announced:.60}, not {pinned}, the "
                              "one pinned for this host with `device trust`; do not use this "
                              "address until you have checked it, then pin the host's new "
                              "line again if its key really changed")
        own = fingerprint(device.key.public_key())
        self._transcript = device_transcript(self.relay_id, self.server_nonce,
                                             self.client_nonce, pinned, own)
        sig = base64.b64encode(device.key.sign(self._transcript)).decode()
        self.to_send = orjson.dumps(
            {"client_nonce": self.client_nonce, "ext_busy": True, "ext_device": own,
             "ext_device_sig": sig, "relay_id": self.relay_id},
            option=orjson.OPT_APPEND_NEWLINE,
        )
        self.state = "sent"

    def _on_reply(self, line: bytes, rest: bytes) -> None:
        msg = _load_object(line)
        if msg is None:
            return self._fail("the relay sent an unreadable reply to the auth line; " + _NOT_A_RELAY)
        if msg.get("ok") is not True:
            if msg.get("ext_busy") is True:
                self._fail(ERROR_BUSY)
                self.state = "unavailable"
                return
            return self._fail(ERROR_DEVICE_REFUSED if self._device else ERROR_REFUSED)
        if self._device is not None:
            sig = _decode_sig(msg.get("ext_host_sig"))
            if sig is None or not _verify(self._device.host_key, sig,
                                          _HOST_PROOF_LABEL + self._transcript):
                return self._fail(ERROR_NO_HOST_PROOF)
            self.state = "accepted"
            self.leftover = rest
            return
        got = _decode_mac(msg.get("relay_mac"))
        want = bytes.fromhex(
            relay_mac(self._token, self.relay_id, self.client_nonce, self.server_nonce)
        )
        if got is None or not hmac.compare_digest(got, want):
            return self._fail(ERROR_NO_PROOF)
        self.state = "accepted"
        self.leftover = rest


# ---------------------------------------------------------------------------------------------
# Credentials


@dataclass(frozen=True)
class Credentials:
    """A relay id and its decoded token, with a note of where they came from for messages."""

    relay_id: str
    token: bytes = field(repr=False)
    source: str = ""
    # Where the token was read from, for `token rotate`: a file it can replace, or the kind
    # of place it cannot ("systemd credential", "CMUX_RELAY_TOKEN").
    path: str | None = None
    origin: str = "file"
    device: DeviceCredential | None = None  # set: a device key signs instead of the token

    def __repr__(self) -> str:
        return (f"Credentials(relay_id={self.relay_id!r}, token=<{len(self.token)} bytes>, "
                f"source={self.source!r})")

    __str__ = __repr__


def parse_token(text: str, *, source: str = "the relay token") -> bytes:
    """Decode a hex token. `source` names where it came from, because the message must say
    which thing to fix and may never quote the token itself."""
    text = text.strip()
    fix = "generate a new one with `cmuxd-remote token new`"
    if not text:
        raise AuthError(f"{source} is empty; {fix}")
    if not _HEX.fullmatch(text):
        raise AuthError(f"{source} is not a hex string; {fix}")
    if len(text) % 2:
        raise AuthError(f"{source} has an odd number of hex digits, so it was probably cut "
                        f"short; copy it again in full, or {fix}")
    token = bytes.fromhex(text)
    if len(token) < MIN_TOKEN_BYTES:
        raise AuthError(f"{source} is only {len(token)} bytes long and at least "
                        f"{MIN_TOKEN_BYTES} are needed; {fix}")
    return token


def read_private_file(path: Path, what: str, check_mode: bool = True) -> str:
    """Read a small secret file, refusing one other users could read or change: a token is a
    shell credential (§7.6), so a leaked one is a remote shell for whoever read it.

    `check_mode` is off only for a systemd credential: systemd grants the service user read
    access through an ACL whose mask shows up as group bits (mode 0440), while the file sits
    on a private read-only mount that no other user can reach.
    """
    try:
        # O_NONBLOCK so that a FIFO put in the token's place cannot hang the start.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise AuthError(f"{what} {path} does not exist; create one with "
                        "`cmuxd-remote token new`") from None
    except PermissionError:
        raise AuthError(f"{what} {path} cannot be read by this user; fix its owner or "
                        "run this as the user that owns it") from None
    except IsADirectoryError:
        raise AuthError(f"{what} {path} is a directory; point to the token file inside it") from None
    try:
        st = os.fstat(fd)  # the file we opened, not whatever the path names a moment later
        if not stat.S_ISREG(st.st_mode):
            raise AuthError(f"{what} {path} is not a regular file; point to the token file")
        if check_mode:
            _check_owner(path, st, what)
        loose = st.st_mode & 0o066 if check_mode else 0
        if loose:
            how = []
            if loose & 0o044:
                how.append("read")
            if loose & 0o022:
                how.append("changed")
            raise AuthError(f"{what} {path} can be {' and '.join(how)} by other users "
                            f"(mode {stat.S_IMODE(st.st_mode):04o}); run chmod 600 {path}")
        if check_mode:
            _check_directories(path, what)
        raw = os.read(fd, _MAX_TOKEN_FILE + 1)
    finally:
        os.close(fd)
    if len(raw) > _MAX_TOKEN_FILE:
        raise AuthError(f"{what} {path} is far too large to hold a token; point to the right file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthError(f"{what} {path} is not text; point to the right file, or create a new "
                        "one with `cmuxd-remote token new`") from None


def _check_owner(path: Path, st: os.stat_result, what: str) -> None:
    """Whoever owns the token file can rewrite it, and with it hold our shell."""
    uid = os.geteuid()
    if st.st_uid not in (uid, 0):
        raise AuthError(f"{what} {path} belongs to uid {st.st_uid}, not to this user (uid {uid}) "
                        f"or root, so its owner could change the token; run chown {uid} {path} "
                        "or point to a token file of your own")


def _check_directories(path: Path, what: str) -> None:
    """ssh's StrictModes for the directories above the token: each must belong to this user
    or root and be writable by nobody else, or whoever can write there could put a token of
    their own in its place. Unlike ssh, a sticky directory such as /tmp passes when it belongs
    to this user or root: the sticky bit lets nobody but its owner rename or remove our
    entry in it."""
    uid = os.geteuid()
    directory = Path(os.path.realpath(path)).parent
    while True:
        st = os.stat(directory)
        if st.st_uid not in (uid, 0):
            raise AuthError(f"{what} {path} lies in {directory}, which belongs to uid "
                            f"{st.st_uid}, so that user could replace the token; keep the "
                            "token in a directory of your own")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise AuthError(f"{what} {path} lies in {directory}, which other users can write "
                            f"to (mode {stat.S_IMODE(st.st_mode):04o}), so they could replace "
                            f"the token; run chmod go-w {directory} or keep the token elsewhere")
        if directory.parent == directory:
            return
        directory = directory.parent


def _load_token_file(path: os.PathLike | str, what: str = "token file",
                     check_mode: bool = True) -> tuple[str | None, bytes]:
    """(relay id or None, token) from a hex line or a §7.7 JSON auth file."""
    path = Path(path)
    text = read_private_file(path, what, check_mode).strip()
    if not text.startswith("{"):
        return None, parse_token(text, source=f"the token in {path}")
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        # `from None`: the decode error keeps the whole document, token included.
        raise AuthError(f"{what} {path} starts like JSON but is not valid JSON; write it as "
                        '{"relay_id": "...", "relay_token": "..."} or as one hex line') from None
    token_text = obj.get("relay_token") if type(obj) is dict else None
    if type(token_text) is not str:
        raise AuthError(f"{what} {path} has no relay_token string; write it as "
                        '{"relay_id": "...", "relay_token": "..."} or as one hex line')
    relay_id = obj.get("relay_id")
    if relay_id is not None:
        if type(relay_id) is not str or not relay_id.strip() or "\n" in relay_id.strip():
            raise AuthError(f"{what} {path} has a relay_id that is not a non-empty one-line "
                            "string; fix it or remove the key")
        relay_id = relay_id.strip()
    return relay_id, parse_token(token_text, source=f"the relay_token in {path}")


def read_token_file(path: os.PathLike | str) -> bytes:
    """The token of a hex-line or JSON auth file; see `_load_token_file` for the relay id."""
    return _load_token_file(path)[1]


def _home(env: Mapping[str, str]) -> Path:
    home = env.get("HOME")
    return Path(home) if home else Path.home()


def config_home(env: Mapping[str, str] = os.environ) -> Path:
    """$XDG_CONFIG_HOME, else ~/.config; the XDG spec says a relative value must be ignored."""
    config = env.get("XDG_CONFIG_HOME")
    return Path(config) if config and os.path.isabs(config) else _home(env) / ".config"


def default_token_path(env: Mapping[str, str] = os.environ) -> Path:
    return config_home(env) / "cmuxd" / TOKEN_FILE_NAME


def write_new_token(path: os.PathLike | str | None = None, *, force: bool = False,
                    env: Mapping[str, str] = os.environ) -> Path:
    """Create a 32-byte token file readable only by its owner, and return its path."""
    path = Path(path) if path is not None else default_token_path(env)
    if path.exists() and not force:
        raise AuthError(f"token file {path} already exists; keep using it, or replace it with "
                        "`cmuxd-remote token new --force` (clients holding the old one will "
                        "then be refused)")
    _write_token_file(path, (secrets.token_hex(32) + "\n").encode("ascii"), replace=force)
    return path


def rotate_token_file(path: os.PathLike | str) -> bytes:
    """Replace the token in an existing token file with a fresh one and return it.

    The file's form (hex line, or JSON with its relay id) and its owner are kept, so a daemon
    that reads it again, and clients that share it, see only the token change.
    """
    path = Path(path)
    relay_id, _ = _load_token_file(path)
    owner = os.stat(path)
    token = secrets.token_bytes(32)
    if relay_id is None:
        data = (token.hex() + "\n").encode("ascii")
    else:
        data = orjson.dumps({"relay_id": relay_id, "relay_token": token.hex()},
                            option=orjson.OPT_APPEND_NEWLINE)
    _write_token_file(path, data, replace=True, owner=(owner.st_uid, owner.st_gid))
    return token


def write_private_file(path: Path, data: bytes, *, replace: bool = True,
                       owner: tuple[int, int] | None = None) -> None:
    """Write a secret file created 0600 (never chmod-ed later, so it is never readable by
    others, not even for a moment). Replacing goes through a private temporary file and a
    rename, so a crash cannot leave a half-written file behind; without `replace` an existing
    file is an error (FileExistsError)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    target = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp") if replace else path
    fd = os.open(target, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only remove bits, but make the mode exact anyway
        if owner is not None and owner != (os.geteuid(), os.getegid()):
            os.fchown(fd, *owner)  # root rotating a user's file leaves it that user's
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(target)
        raise
    os.close(fd)
    if target != path:
        os.replace(target, path)


def _write_token_file(path: Path, data: bytes, *, replace: bool,
                      owner: tuple[int, int] | None = None) -> None:
    """`write_private_file` for a token: only below directories nobody else can write to."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_directories(path, "token file")
    try:
        write_private_file(path, data, replace=replace, owner=owner)
    except FileExistsError:
        raise AuthError(f"token file {path} was created by someone else just now; check it, "
                        "then run the command again") from None
    except PermissionError:
        raise AuthError(f"cannot write in {path.parent} as this user; run the command as the "
                        "owner of the token file") from None


def _env_value(env: Mapping[str, str], name: str) -> str:
    return (env.get(name) or "").strip()


def short_hostname() -> str:
    """The daemon's default relay id, and a client's guess at a daemon on this host."""
    return os.uname().nodename.split(".")[0] or "localhost"


def server_credentials(token_file: os.PathLike | str | None = None, relay_id: str | None = None,
                       env: Mapping[str, str] = os.environ) -> Credentials:
    """The daemon's own credentials.

    Token: --token-file, then the systemd credential $CREDENTIALS_DIRECTORY/relay-token, then
    CMUX_RELAY_TOKEN, then the default token file. Relay id: --relay-id, then the relay_id of
    a JSON token file (it belongs with the token beside it, and clients given the same file
    read it first too), then CMUX_RELAY_ID, then the short host name, which is what a fleet
    of hosts on one mesh would use anyway.
    """
    file_id: str | None = None
    path: str | None = None
    origin = "file"
    cred_dir = _env_value(env, "CREDENTIALS_DIRECTORY")
    env_token = _env_value(env, "CMUX_RELAY_TOKEN")
    if token_file is not None:
        file_id, token = _load_token_file(token_file)
        token_from = f"--token-file {token_file}"
        path = os.path.abspath(token_file)
    elif cred_dir and os.path.exists(os.path.join(cred_dir, TOKEN_FILE_NAME)):
        cred_path = os.path.join(cred_dir, TOKEN_FILE_NAME)
        file_id, token = _load_token_file(cred_path, "systemd credential", check_mode=False)
        token_from = f"systemd credential {cred_path}"
        origin = "systemd credential"
    elif env_token:
        token = parse_token(env_token, source="CMUX_RELAY_TOKEN")
        token_from = "CMUX_RELAY_TOKEN"
        origin = "CMUX_RELAY_TOKEN"
    else:
        default = default_token_path(env)
        if not default.exists():
            raise AuthError(f"no relay token is configured; create one with `cmuxd-remote token "
                            f"new` (it writes {default}), or pass --token-file, or set "
                            "CMUX_RELAY_TOKEN")
        file_id, token = _load_token_file(default)
        token_from = str(default)
        path = str(default)

    if relay_id is not None:
        rid, id_from = relay_id.strip(), "--relay-id"
    elif file_id:
        rid, id_from = file_id, "the token file"
    elif _env_value(env, "CMUX_RELAY_ID"):
        rid, id_from = _env_value(env, "CMUX_RELAY_ID"), "CMUX_RELAY_ID"
    else:
        rid, id_from = short_hostname(), "the host name"
    if not rid or "\n" in rid:
        raise AuthError(f"the relay id from {id_from} is empty or spans lines; pass a one-line "
                        "--relay-id")
    return Credentials(rid, token, f"token from {token_from}, relay id from {id_from}", path,
                       origin)


def client_credentials(port: int | None, token_file: os.PathLike | str | None = None,
                       relay_id: str | None = None,
                       env: Mapping[str, str] = os.environ) -> Credentials:
    """Credentials for dialling a TCP relay at `port`.

    Order: --token-file (an explicit flag beats the environment, which inside a cmux SSH
    workspace holds the app's own relay credentials), then CMUX_RELAY_ID with
    CMUX_RELAY_TOKEN, then ~/.cmux/relay/<port>.auth (§7.7), then the default token file.
    --relay-id, when given, always names the relay id.
    """
    env_id = _env_value(env, "CMUX_RELAY_ID")
    env_token = _env_value(env, "CMUX_RELAY_TOKEN")
    if relay_id is not None:
        relay_id = relay_id.strip()
        if not relay_id or "\n" in relay_id:
            raise AuthError("the --relay-id given is empty or spans lines; pass the one-line "
                            "relay id the daemon was started with")

    def pick_id(file_id: str | None, path: object) -> tuple[str, str]:
        if relay_id is not None:
            return relay_id, "--relay-id"
        if file_id:
            return file_id, str(path)
        if env_id:
            return env_id, "CMUX_RELAY_ID"
        raise NoRelayIdError(f"{path} holds a token but no relay id; pass --relay-id, set "
                        'CMUX_RELAY_ID, or write the file as {"relay_id": "...", '
                        '"relay_token": "..."}')

    if token_file is not None:
        file_id, token = _load_token_file(token_file)
        rid, id_from = pick_id(file_id, token_file)
        return Credentials(rid, token, f"token from --token-file {token_file}, relay id from {id_from}")
    if env_id and env_token:
        token = parse_token(env_token, source="CMUX_RELAY_TOKEN")
        if relay_id is not None:
            return Credentials(relay_id, token, "token from CMUX_RELAY_TOKEN, relay id from --relay-id")
        return Credentials(env_id, token, "CMUX_RELAY_ID and CMUX_RELAY_TOKEN")
    if port is not None:
        auth_path = _home(env) / ".cmux" / "relay" / f"{int(port)}.auth"
        if auth_path.exists():
            file_id, token = _load_token_file(auth_path, "relay auth file")
            rid, id_from = pick_id(file_id, auth_path)
            return Credentials(rid, token, f"token from {auth_path}, relay id from {id_from}")
    default = default_token_path(env)
    if default.exists():
        file_id, token = _load_token_file(default)
        rid, id_from = pick_id(file_id, default)
        return Credentials(rid, token, f"token from {default}, relay id from {id_from}")
    raise AuthError("no relay credentials for this address; set CMUX_RELAY_ID and "
                    "CMUX_RELAY_TOKEN, pass --token-file, or copy the daemon's token to "
                    f"{default}")
