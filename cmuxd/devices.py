"""Device keys on disk: a device's own key pair and the hosts it pins, a host's key pair and
the devices it authorizes, like ssh's id_ed25519, known_hosts, host keys and authorized_keys.

Only public halves are ever printed or copied between machines. Private keys are created
0600 and read only when nobody else can read or change them; the authorized-devices file is
edited under a lock and replaced atomically, so two `device add` at once cannot lose a line.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import os
import re
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .auth import AuthError, config_home, fingerprint, read_private_file, write_private_file

DEVICE_LINE_TYPE = "cmuxd-device-ed25519"
HOST_LINE_TYPE = "cmuxd-host-ed25519"
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MAX_FILE = 1 << 20


class DeviceError(AuthError):
    """A device file or line is missing, unsafe or malformed; the message says what to do."""


@dataclass(frozen=True)
class AuthorizedDevice:
    name: str
    key: Ed25519PublicKey
    added: int

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)


@dataclass(frozen=True)
class HostPin:
    host: str
    relay_id: str
    key: Ed25519PublicKey


def config_dir(env: Mapping[str, str] = os.environ) -> Path:
    return config_home(env) / "cmuxd"


def device_key_path(env: Mapping[str, str] = os.environ) -> Path:
    return config_dir(env) / "device-key"


def host_key_path(env: Mapping[str, str] = os.environ) -> Path:
    return config_dir(env) / "host-key"


def authorized_devices_path(env: Mapping[str, str] = os.environ) -> Path:
    return config_dir(env) / "authorized-devices"


def known_hosts_path(env: Mapping[str, str] = os.environ) -> Path:
    return config_dir(env) / "known-hosts"


def _raw(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_line(kind: str, key: Ed25519PublicKey, label: str) -> str:
    return f"{kind} {base64.b64encode(_raw(key)).decode()} {label}"


def parse_public_line(line: str, kind: str) -> tuple[Ed25519PublicKey, str]:
    """(key, label) of a public line of `kind`; DeviceError says what is wrong with it."""
    what = "device" if kind == DEVICE_LINE_TYPE else "host"
    source = "`cmuxd-remote device key` on the device" if kind == DEVICE_LINE_TYPE \
        else "`cmuxd-remote device add` on the host"
    parts = line.strip().split()
    if len(parts) != 3 or parts[0] != kind:
        raise DeviceError(f"that is not a {what} public line (`{kind} KEY NAME`); copy the "
                          f"whole line {source} printed")
    try:
        raw = base64.b64decode(parts[1], validate=True)
        key = Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise DeviceError(f"the key in that {what} line is not a valid Ed25519 public key; "
                          f"copy the whole line {source} printed") from None
    if not NAME.fullmatch(parts[2]):
        raise DeviceError(f"the name in that {what} line must be 1 to 64 letters, digits, "
                          "dots, dashes or underscores")
    return key, parts[2]


# private keys


def _load_private_key(path: Path, what: str) -> Ed25519PrivateKey:
    text = read_private_file(path, what).strip()
    try:
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text))
    except ValueError:
        raise DeviceError(f"{what} {path} is damaged; move it away and make a new one (its "
                          "public line must then be added again wherever it was)") from None


def _create_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private_file(path, (seed.hex() + "\n").encode(), replace=False)
    return key


def key_pair(path: Path, what: str) -> Ed25519PrivateKey:
    """The key pair at `path`, made once: later calls read it."""
    if path.exists():
        return _load_private_key(path, what)
    try:
        return _create_private_key(path)
    except FileExistsError:  # made by a concurrent call just now
        return _load_private_key(path, what)


def load_key(path: Path, what: str, make: str) -> Ed25519PrivateKey:
    if not path.exists():
        raise DeviceError(f"there is no {what} at {path}; make one with `{make}`")
    return _load_private_key(path, what)


# the host's authorized devices


def _check_shared_file(path: Path, st: os.stat_result, what: str) -> None:
    """A public-key list anyone else could change would let them add a device."""
    if not stat.S_ISREG(st.st_mode):
        raise DeviceError(f"{what} {path} is not a regular file; move it away")
    if st.st_uid not in (os.geteuid(), 0):
        raise DeviceError(f"{what} {path} belongs to uid {st.st_uid}, not to this user; "
                          f"run chown {os.geteuid()} {path}")
    if st.st_mode & 0o022:
        raise DeviceError(f"{what} {path} can be changed by other users (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); run chmod 600 {path}")


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        _check_shared_file(path, os.fstat(fd), what)
        raw = os.read(fd, _MAX_FILE)
    finally:
        os.close(fd)
    return raw.decode("utf-8", "replace").splitlines()


def read_authorized(path: Path) -> dict[str, AuthorizedDevice]:
    """name -> device; a line that does not parse is refused with its line number, so a
    hand edit cannot silently drop a device or let one in."""
    devices: dict[str, AuthorizedDevice] = {}
    for number, line in enumerate(_read_lines(path, "authorized-devices file"), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        try:
            key, name = parse_public_line(" ".join(parts[:3]), DEVICE_LINE_TYPE)
            added = int(parts[3].removeprefix("added=")) if len(parts) > 3 else 0
        except (DeviceError, ValueError) as exc:
            raise DeviceError(f"{path} line {number}: {exc}") from None
        if name in devices:
            raise DeviceError(f"{path} line {number}: device {name} is listed twice; remove "
                              "one of the lines")
        devices[name] = AuthorizedDevice(name, key, added)
    return devices


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _replace_lines(path: Path, lines: list[str]) -> None:
    write_private_file(path, "".join(line + "\n" for line in lines).encode())


def _line(device: AuthorizedDevice) -> str:
    return f"{public_line(DEVICE_LINE_TYPE, device.key, device.name)} added={device.added}"


def add_device(path: Path, name: str, line: str) -> AuthorizedDevice:
    """Authorize the device whose public `line` was given, under `name`."""
    if not NAME.fullmatch(name):
        raise DeviceError("a device name must be 1 to 64 letters, digits, dots, dashes or "
                          "underscores")
    key, _ = parse_public_line(line, DEVICE_LINE_TYPE)
    with _locked(path):
        devices = read_authorized(path)
        if name in devices:
            raise DeviceError(f"a device named {name} is already authorized; choose another "
                              f"name, or `cmuxd-remote device revoke {name}` first")
        for other in devices.values():
            if _raw(other.key) == _raw(key):
                raise DeviceError(f"that key is already authorized as device {other.name}")
        device = AuthorizedDevice(name, key, int(time.time()))
        devices[name] = device
        _replace_lines(path, [_line(d) for d in devices.values()])
    return device


def revoke_device(path: Path, name: str) -> AuthorizedDevice:
    with _locked(path):
        devices = read_authorized(path)
        device = devices.pop(name, None)
        if device is None:
            raise DeviceError(f"no device is named {name}; `cmuxd-remote device list` shows "
                              "them")
        _replace_lines(path, [_line(d) for d in devices.values()])
    return device


# the device's pinned hosts


def read_pins(path: Path) -> dict[str, HostPin]:
    pins: dict[str, HostPin] = {}
    for number, line in enumerate(_read_lines(path, "known-hosts file"), 1):
        parts = line.split()
        if not parts or line.startswith("#"):
            continue
        try:
            if len(parts) != 4:
                raise DeviceError("expected `HOST cmuxd-host-ed25519 KEY RELAY_ID`")
            key, relay_id = parse_public_line(" ".join(parts[1:]), HOST_LINE_TYPE)
        except DeviceError as exc:
            raise DeviceError(f"{path} line {number}: {exc}") from None
        pins[parts[0]] = HostPin(parts[0], relay_id, key)
    return pins


def pin_host(path: Path, host: str, line: str) -> HostPin:
    """Pin the host key of `line` for `host`, replacing an earlier pin of that host."""
    if not host or any(c.isspace() for c in host):
        raise DeviceError("the host must be one word, as you will type it in `ping HOST`")
    key, relay_id = parse_public_line(line, HOST_LINE_TYPE)
    with _locked(path):
        pins = read_pins(path)
        pins[host] = HostPin(host, relay_id, key)
        _replace_lines(path, [f"{p.host} {public_line(HOST_LINE_TYPE, p.key, p.relay_id)}"
                              for p in pins.values()])
    return pins[host]


@dataclass(frozen=True)
class HostDevices:
    """What the daemon's gate needs: its host key and the devices it accepts."""

    host_key: Ed25519PrivateKey
    host_fp: str
    devices: dict[str, AuthorizedDevice]
    keys: dict[str, tuple[str, Ed25519PublicKey]]  # fingerprint -> (name, key), made once


def load_host_devices(env: Mapping[str, str] = os.environ) -> HostDevices | None:
    """The host's device keys; None while `device add` has never made a host key."""
    path = host_key_path(env)
    if not path.exists():
        return None
    key = _load_private_key(path, "host key")
    authorized = read_authorized(authorized_devices_path(env))
    return HostDevices(key, fingerprint(key.public_key()), authorized,
                       {d.fingerprint: (d.name, d.key) for d in authorized.values()})


def last_used_path(env: Mapping[str, str] = os.environ) -> Path:
    return config_dir(env) / "devices-last-used.json"


def read_last_used(env: Mapping[str, str] = os.environ) -> dict[str, dict]:
    """name -> {"at": epoch seconds, "from": address}; empty when never written or unreadable
    (it is a convenience, not a credential)."""
    try:
        data = orjson.loads(last_used_path(env).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return data if type(data) is dict else {}


def write_last_used(data: dict[str, dict], env: Mapping[str, str] = os.environ) -> None:
    path = last_used_path(env)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _replace_lines(path, [orjson.dumps(data).decode()])
