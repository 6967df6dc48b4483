"""Tailnet addresses of this host, and the --allow-from list of peer networks.

Tailscale numbers every node from two fixed ranges, 100.64.0.0/10 and fd7a:115c:a1e0::/48, so
"the tailnet" is a pair of networks the daemon can check without asking tailscaled anything.
That matters twice: `--tcp tailscale:PORT` must find this host's tailnet addresses even where
the tailscale CLI is absent (a container, a test namespace), and `--allow-from tailnet` must
work before tailscaled is up, when launchd or systemd bind every address at boot.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Iterable

TAILNET_V4 = ipaddress.ip_network("100.64.0.0/10")
TAILNET_V6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")
TAILNET_NETWORKS = (TAILNET_V4, TAILNET_V6)
LOOPBACK_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

# --tcp host keywords: which IP versions of the tailnet addresses each one binds.
TCP_KEYWORDS = {"tailscale": (4, 6), "tailscale4": (4,), "tailscale6": (6,)}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TailnetError(ValueError):
    """No usable tailnet address, or an --allow-from entry that is not a network."""


def is_tailnet(address: IPAddress) -> bool:
    return any(address in network for network in TAILNET_NETWORKS)


def interface_addresses() -> list[IPAddress]:
    """Every address on this host's interfaces (psutil reads them without any privilege)."""
    import socket

    import psutil

    found = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    found.append(ipaddress.ip_address(addr.address.split("%", 1)[0]))
                except ValueError:
                    continue
    return found


def tailscale_cli_addresses() -> list[IPAddress] | None:
    """What `tailscale ip` prints, or None when the CLI is not installed or fails."""
    tailscale = shutil.which("tailscale")
    if tailscale is None:
        return None
    try:
        out = subprocess.run([tailscale, "ip"], capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    found = []
    for word in out.stdout.split():
        try:
            found.append(ipaddress.ip_address(word))
        except ValueError:
            continue
    return found


def tailnet_addresses(versions: Iterable[int] = (4, 6)) -> list[str]:
    """This host's tailnet addresses of the given IP versions, IPv4 first, in a stable order.

    The interfaces are asked first, because binding needs an address that is really on one
    (`tailscale ip` also answers under userspace networking, where no interface carries it);
    the CLI is the fallback for hosts whose tailnet interface psutil cannot see.
    """
    versions = tuple(versions)
    found = [a for a in interface_addresses() if is_tailnet(a)]
    cli = None
    if not found:
        cli = tailscale_cli_addresses()
        found = [a for a in cli or () if is_tailnet(a)]
    wanted = sorted({a for a in found if a.version in versions},
                    key=lambda a: (a.version, a.packed))
    if wanted:
        return [str(a) for a in wanted]
    kinds = " or ".join(f"IPv{v}" for v in versions)
    if found:
        raise TailnetError(
            f"this host has tailnet addresses, but no {kinds} one; use tailscale: to bind "
            "every tailnet address")
    where = ("`tailscale ip` printed none" if cli is not None
             else "the tailscale CLI is not installed or not answering")
    raise TailnetError(
        f"this host has no tailnet address: no interface has one in {TAILNET_V4} or "
        f"{TAILNET_V6}, and {where}. Bring tailscale up (`tailscale up`) and try again, or, "
        "to bind before it is up, use --tcp :PORT --allow-from tailnet")


class AllowList:
    """The peer networks --allow-from lets through to the handshake; everyone else is closed
    at accept, so a peer outside them never sees a challenge to work on."""

    def __init__(self, networks: Iterable[IPNetwork], specs: Iterable[str] = ()):
        self.networks = tuple(networks)
        self.specs = tuple(specs)

    @classmethod
    def parse(cls, specs: Iterable[str]) -> "AllowList":
        """`tailnet`, `loopback`, an address or a CIDR network; entries may also be given
        comma-separated in one value."""
        networks: list[IPNetwork] = []
        items = []
        for spec in specs:
            for item in spec.replace(",", " ").split():
                items.append(item)
                if item == "tailnet":
                    networks.extend(TAILNET_NETWORKS)
                elif item == "loopback":
                    networks.extend(LOOPBACK_NETWORKS)
                else:
                    try:
                        networks.append(ipaddress.ip_network(item, strict=False))
                    except ValueError:
                        raise TailnetError(
                            f"--allow-from {item!r} is not `tailnet`, `loopback`, an IP address "
                            "or a CIDR network such as 100.64.0.0/10; correct it and start "
                            "again") from None
        if not networks:
            raise TailnetError("--allow-from was given no network; name at least one, such as "
                               "tailnet")
        return cls(networks, items)

    def allows(self, host: str) -> bool:
        """Whether a peer address (as accept() reports it) is inside the list. An IPv4 peer
        of a dual-stack socket arrives as ::ffff:a.b.c.d and is judged as the IPv4 address."""
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def __str__(self) -> str:
        return ", ".join(self.specs) or ", ".join(str(n) for n in self.networks)
