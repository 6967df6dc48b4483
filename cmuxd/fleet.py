"""The fleet file, cmux.json: made from `tailscale status --json`, read by every client command.

A fleet is the hosts of a tailnet that run the daemon. Tailscale already knows them (their
MagicDNS names, their addresses, the tags an admin gave them), so cmux.json is derived from
its status document rather than typed by hand, and is written deterministically (sorted keys,
sorted hosts, no timestamps) so it can live in a dotfiles repository and diff cleanly.

Format, version 1 (every key is always present):

    {
      "version": 1,
      "tailnet": "tail1234.ts.net",            MagicDNS suffix; "" when MagicDNS is off
      "hosts": [                               sorted by name; names are unique
        {
          "name": "honey",                     what `cmuxd-remote ping honey` takes
          "dns_name": "honey.tail1234.ts.net", MagicDNS name without the trailing dot, or ""
          "tailnet_ips": ["100.101.102.103", "fd7a:115c:a1e0::1"],
          "uri": "cmux://honey.tail1234.ts.net:5555",
          "relay_id": "honey",                 what the daemon there was started with
          "credentials": {"token_file": "~/.config/cmuxd/relay-token"},
          "tags": ["tag:cmuxd-fleet"],
          "os": "linux"
        }
      ]
    }

`credentials.token_file` is the client-side file holding that host's relay token (`~` is
expanded on use, so one file serves every machine of a person); null means the usual lookup
(CMUX_RELAY_ID/CMUX_RELAY_TOKEN, ~/.cmux/relay/<port>.auth, the default token file). The file
holds no secret itself.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .auth import config_home
from .config import DEFAULT_PORT

FORMAT_VERSION = 1
DEFAULT_TOKEN_FILE = "~/.config/cmuxd/relay-token"
FLEET_FILE_NAME = "cmux.json"
SRV_SERVICE = "_cmux._tcp"
SRV_TTL = 300

_LABEL_JUNK = re.compile(r"[^a-z0-9-]+")


class FleetError(Exception):
    """cmux.json or a tailscale status document could not be used; the message says why and
    what to do about it."""


@dataclass(frozen=True)
class FleetHost:
    name: str
    dns_name: str
    tailnet_ips: tuple[str, ...]
    uri: str
    relay_id: str
    token_file: str | None = None
    tags: tuple[str, ...] = ()
    os: str = ""
    device_key: str | None = None
    """This device's key file and the file pinning the host's key (`device trust`): with
    them the host is reached with the device key, and cmux.json holds no secret."""
    known_hosts: str | None = None

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "dns_name": self.dns_name,
            "tailnet_ips": list(self.tailnet_ips),
            "uri": self.uri,
            "relay_id": self.relay_id,
            "credentials": {"token_file": self.token_file,
                            **({"device_key": self.device_key, "known_hosts": self.known_hosts}
                               if self.device_key else {})},
            "tags": list(self.tags),
            "os": self.os,
        }


@dataclass
class Fleet:
    hosts: list[FleetHost] = field(default_factory=list)
    tailnet: str = ""
    path: Path | None = None

    def find(self, name: str) -> FleetHost | None:
        """A host by its name or its MagicDNS name (with or without the trailing dot)."""
        name = name.rstrip(".").lower()
        for host in self.hosts:
            if host.name == name or (host.dns_name and host.dns_name.lower() == name):
                return host
        return None

    def to_json(self) -> dict:
        return {"version": FORMAT_VERSION, "tailnet": self.tailnet,
                "hosts": [h.to_json() for h in sorted(self.hosts, key=lambda h: h.name)]}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------
# Where cmux.json lives


def fleet_path(env: Mapping[str, str] = os.environ) -> Path:
    """$CMUX_FLEET, else $XDG_CONFIG_HOME/cmuxd/cmux.json, else ~/.config/cmuxd/cmux.json."""
    explicit = env.get("CMUX_FLEET", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    return config_home(env) / "cmuxd" / FLEET_FILE_NAME


def load_fleet(path: os.PathLike | str | None = None, *, missing_ok: bool = False,
               env: Mapping[str, str] = os.environ) -> Fleet | None:
    """Read cmux.json; None when it does not exist and `missing_ok`."""
    path = Path(path) if path is not None else fleet_path(env)
    regenerate = "regenerate it with `cmuxd-remote fleet config > FILE`"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return None
        raise FleetError(f"no fleet file at {path}; write one with `cmuxd-remote fleet config "
                         f"--from-tailscale > {path}`, or point CMUX_FLEET at yours") from None
    except OSError as exc:
        raise FleetError(f"cannot read the fleet file {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise FleetError(f"{path} is not valid JSON ({exc}); {regenerate}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("hosts"), list):
        raise FleetError(f"{path} is not a cmux.json fleet file (no hosts list); {regenerate}")
    version = doc.get("version")
    if version != FORMAT_VERSION:
        raise FleetError(f"{path} is cmux.json version {version!r}, and this cmuxd reads "
                         f"version {FORMAT_VERSION}; {regenerate}")
    hosts = []
    for i, entry in enumerate(doc["hosts"]):
        try:
            creds = entry.get("credentials") or {}
            token_file = creds.get("token_file")
            device_key, known_hosts = creds.get("device_key"), creds.get("known_hosts")
            if bool(device_key) != bool(known_hosts):
                raise FleetError(f"{path}: host #{i + 1} names a device_key without "
                                 "known_hosts or the other way round; a device key needs the "
                                 "host's key pinned (`cmuxd-remote device trust`)")
            hosts.append(FleetHost(
                name=str(entry["name"]),
                dns_name=str(entry.get("dns_name") or ""),
                tailnet_ips=tuple(str(ip) for ip in entry.get("tailnet_ips") or ()),
                uri=str(entry["uri"]),
                relay_id=str(entry["relay_id"]),
                token_file=os.path.expanduser(token_file) if token_file else None,
                tags=tuple(str(t) for t in entry.get("tags") or ()),
                os=str(entry.get("os") or ""),
                device_key=os.path.expanduser(str(device_key)) if device_key else None,
                known_hosts=os.path.expanduser(str(known_hosts)) if known_hosts else None,
            ))
        except (AttributeError, KeyError, TypeError) as exc:
            raise FleetError(f"{path}: host #{i + 1} lacks {exc} or is not an object; "
                             f"{regenerate}") from None
    return Fleet(hosts, str(doc.get("tailnet") or ""), path)


def lookup_host(name: str, env: Mapping[str, str] = os.environ) -> FleetHost | None:
    """The cmux.json entry a client address names, if the fleet file has one; a missing file
    means no fleet, an unreadable one is an error worth seeing."""
    fleet = load_fleet(missing_ok=True, env=env)
    return fleet.find(name) if fleet is not None else None


# ---------------------------------------------------------------------------------------------
# From `tailscale status --json`


def read_tailscale_status(source: str | None) -> dict:
    """The status document from the tailscale CLI (source None), stdin ("-") or a file."""
    if source is None:
        tailscale = shutil.which("tailscale")
        if tailscale is None:
            raise FleetError("the tailscale CLI is not installed here; run `tailscale status "
                             "--json > status.json` on a host of the tailnet and pass "
                             "--from-tailscale status.json (or - for stdin)")
        try:
            out = subprocess.run([tailscale, "status", "--json"], capture_output=True,
                                 timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FleetError(f"`tailscale status --json` did not run ({exc}); is tailscaled "
                             "running?") from None
        if out.returncode != 0:
            detail = out.stderr.decode(errors="replace").strip().splitlines()
            raise FleetError("`tailscale status --json` failed"
                             + (f" ({detail[-1]})" if detail else "")
                             + "; is tailscaled running and logged in (`tailscale up`)?")
        text, origin = out.stdout.decode(errors="replace"), "`tailscale status --json`"
    elif source == "-":
        text, origin = sys.stdin.read(), "standard input"
    else:
        try:
            text, origin = Path(source).read_text(encoding="utf-8"), source
        except OSError as exc:
            raise FleetError(f"cannot read {source}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except ValueError:
        raise FleetError(f"{origin} is not JSON; give the output of `tailscale status --json`"
                         ) from None
    if not isinstance(doc, dict) or not ("Self" in doc or "Peer" in doc):
        raise FleetError(f"{origin} has no Self or Peer; give the output of "
                         "`tailscale status --json`")
    return doc


def _label(text: str) -> str:
    return _LABEL_JUNK.sub("-", text.lower()).strip("-")


def _nodes(doc: dict) -> list[dict]:
    nodes = []
    if isinstance(doc.get("Self"), dict):
        nodes.append(doc["Self"])
    peers = doc.get("Peer") or {}
    if isinstance(peers, dict):
        nodes.extend(p for _, p in sorted(peers.items()) if isinstance(p, dict))
    return nodes


def _magic_dns_suffix(doc: dict) -> str:
    current = doc.get("CurrentTailnet")
    suffix = (current.get("MagicDNSSuffix") if isinstance(current, dict) else None) \
        or doc.get("MagicDNSSuffix") or ""
    return str(suffix).rstrip(".")


def _magic_dns_enabled(doc: dict) -> bool:
    """Whether clients of this tailnet resolve MagicDNS names; nodes have a DNSName either
    way, but with MagicDNS off only their addresses can be dialled."""
    current = doc.get("CurrentTailnet")
    if isinstance(current, dict) and "MagicDNSEnabled" in current:
        return bool(current["MagicDNSEnabled"])
    return True


def _address_sort_key(ip: str):
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return (7, b"", ip)
    return (address.version, address.packed, ip)


def _portable(path: str | None) -> str | None:
    """Keep `~/…` as written, so one cmux.json serves every machine of a person; make other
    relative paths absolute, since a client may run from any directory."""
    if path is None or path.startswith("~"):
        return path
    return os.path.abspath(path)


def fleet_from_tailscale(doc: dict, *, tags: Iterable[str] = (), port: int = DEFAULT_PORT,
                         token_file: str | None = DEFAULT_TOKEN_FILE,
                         token_dir: str | None = None,
                         relay_id: str | None = None) -> Fleet:
    """The fleet in a status document: every node carrying one of `tags` (every node when
    none is given), online or not, since a host that is down now is still part of the fleet.

    Names are the first label of the MagicDNS name (already unique in a tailnet), else the
    host name made DNS-safe; URIs use the MagicDNS name, or the IPv4 address when MagicDNS is
    off; relay ids default to the short host name, which is the daemon's own default.
    `token_dir` gives each host its own token file, DIR/<name>.
    """
    wanted = {t if t.startswith("tag:") else f"tag:{t}" for t in tags}
    token_file, token_dir = _portable(token_file), _portable(token_dir)
    candidates = []
    for node in _nodes(doc):
        node_tags = tuple(sorted(str(t) for t in node.get("Tags") or ()))
        if wanted and not wanted.intersection(node_tags):
            continue
        dns_name = str(node.get("DNSName") or "").rstrip(".")
        host_name = str(node.get("HostName") or "")
        ips = tuple(sorted((str(ip) for ip in node.get("TailscaleIPs") or ()),
                           key=_address_sort_key))
        name = _label(dns_name.split(".", 1)[0]) if dns_name else _label(host_name)
        if not name and ips:
            name = "node-" + _label(ips[0].replace(".", "-").replace(":", "-"))
        if not name or not (dns_name or ips):
            continue  # nothing to dial
        candidates.append((name, dns_name, ips, host_name, node_tags, str(node.get("OS") or "")))
    by_name = _magic_dns_enabled(doc)
    hosts = []
    taken: set[str] = set()
    for name, dns_name, ips, host_name, node_tags, node_os in sorted(candidates):
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}-{n}"
        taken.add(unique)
        target = (dns_name if by_name else "") or next((ip for ip in ips if ":" not in ip),
                                                        ips[0] if ips else dns_name)
        shown = f"[{target}]" if ":" in target else target
        rid = relay_id or (host_name.split(".", 1)[0] if host_name else unique)
        if token_dir is not None:
            tfile = str(Path(token_dir) / unique)
        else:
            tfile = token_file
        hosts.append(FleetHost(unique, dns_name, ips, f"cmux://{shown}:{port}", rid, tfile,
                               node_tags, node_os))
    return Fleet(hosts, _magic_dns_suffix(doc))


def srv_records(fleet: Fleet, zone: str, ttl: int = SRV_TTL) -> str:
    """Zone-file lines `_cmux._tcp.NAME.ZONE. SRV 0 0 PORT TARGET.` for a DNS zone the user
    runs: MagicDNS answers only A and AAAA, so port discovery has to live elsewhere."""
    zone = zone.strip().rstrip(".")
    if not zone:
        raise FleetError("--srv needs a zone such as example.org")
    lines = [f"; {SRV_SERVICE} SRV records of the cmuxd fleet, for the zone {zone}."]
    for host in sorted(fleet.hosts, key=lambda h: h.name):
        port = host.uri.rsplit(":", 1)[-1]
        if not host.dns_name:
            lines.append(f"; {host.name}: no MagicDNS name, and an SRV target must be a name")
            continue
        lines.append(f"{SRV_SERVICE}.{host.name}.{zone}. {ttl} IN SRV 0 0 {port} "
                     f"{host.dns_name}.")
    return "\n".join(lines) + "\n"
