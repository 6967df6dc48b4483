"""Service units for systemd and launchd, rendered for this installation.

The units in units/ are these functions' output for a conventional system install
(/usr/local/bin/cmuxd-remote, /etc/cmuxd/relay-token); `cmuxd-remote units install` renders
the same text with the paths of the running installation, so the files a fleet copies and the
files the command writes cannot drift apart (a test compares them).

Rendering is pure (text in, text out); `install_*` is the only part that touches the disk.
"""

from __future__ import annotations

import os
import plistlib
import pwd
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import orjson

from .auth import config_home, default_token_path, write_new_token
from .config import DEFAULT_PORT
from .tailnet import tailscale_cli_addresses

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEM_TOKEN_FILE = Path("/etc/cmuxd/relay-token")
FLEET_COMMAND = ["/usr/local/bin/cmuxd-remote"]
LAUNCHD_LABEL = "com.cmux.cmuxd"
WATCHDOG_SEC = 30
FD_STORE_MAX = 3 * 1024
"""Room in cmuxd-hub.service's fd store for 1,024 sessions, three fds each."""
# Both services use the state directory (the hub's socket, the daemon's control socket, and
# cmuxd.socket's socket file): kept when either stops, so neither pulls it from the other.
RUNTIME_DIRECTORY = """\
RuntimeDirectory=cmuxd
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
"""
# Where a home directory may live; ProtectHome= would hide an interpreter installed there.
HOME_PREFIXES = ("/home/", "/root/", "/run/user/", "/Users/", "/var/home/")


class UnitsError(Exception):
    """The units could not be rendered or installed; the message says what to change."""


@dataclass
class SystemdUnits:
    mode: str  # "user" (systemctl --user) or "system"
    command: list[str]  # the installed cmuxd-remote, absolute
    token_file: Path  # what LoadCredential= hands the service as relay-token
    user: str | None = None  # User= for a system unit
    port: int = DEFAULT_PORT
    protect_home: bool = True
    tmp_binds: list[str] = field(default_factory=list)  # our own files under /tmp, /var/tmp
    tailnet: list[str] = field(default_factory=list)  # extra addresses (drop-in)
    serve_args: list[str] = field(default_factory=list)
    at_boot: bool = False  # a user service starts with its manager; system ones always do

    def render(self) -> dict[str, str]:
        """{path relative to the unit directory: text}."""
        units = {"cmuxd.socket": self.socket(), "cmuxd.service": self.service(),
                 "cmuxd-hub.service": self.hub_service()}
        if self.tailnet:
            units["cmuxd.socket.d/tailnet.conf"] = tailnet_dropin(self.tailnet, self.port)
        return units

    @property
    def system(self) -> bool:
        return self.mode == "system"

    def socket(self) -> str:
        # The socket's directory must be traversable by User= before the service first runs
        # (systemd creates it as root); the socket file itself is 0600 and owned by User=.
        owner = ""
        if self.system and self.user not in (None, "root"):
            owner = f"SocketUser={self.user}\n"
        return f"""\
# cmux remote daemon: the sockets. systemd listens and holds them across restarts of
# cmuxd.service: connections that arrive meanwhile wait in the backlog.
[Unit]
Description=cmux remote daemon sockets

[Socket]
ListenStream=127.0.0.1:{self.port}
ListenStream=%t/cmuxd/cmuxd.sock
FileDescriptorName=cmuxd
Accept=no
Backlog=1024
SocketMode=0600
DirectoryMode={"0755" if self.system else "0700"}
{owner}
[Install]
WantedBy=sockets.target
"""

    def _user(self) -> str:
        """User= for a system unit; the daemon and the hub always run as the same account
        (each checks that the other end of the hub socket is its own uid)."""
        if self.system and self.user is not None:
            return f"User={self.user}\n"
        if self.system:
            return ("# User= the account whose shells the hub starts (root without it):\n"
                    "# `cmuxd-remote units install --system --as USER` sets it.\n")
        return ""

    def service(self) -> str:
        exec_start = " ".join(
            [*(exec_quote(a) for a in self.command), "serve", "--state-dir=%t/cmuxd",
             "--external-hub", *(exec_quote(a) for a in self.serve_args)])
        if self.system or self.at_boot:
            target = "multi-user.target" if self.system else "default.target"
            when = "at boot" if self.system else "with the user manager"
            started = f"Started {when} ({target}) and by cmuxd.socket's first connection"
            install = f"WantedBy={target}\nAlso=cmuxd.socket\n"
        else:
            started = "Started by cmuxd.socket's first connection"
            install = "Also=cmuxd.socket\n"
        return f"""\
# cmux remote daemon: the gate (accept, authenticate) and the workers.
# {started}.
# It faces the network and runs no user command, so it carries a strict sandbox; PTY
# sessions belong to cmuxd-hub.service, which a restart of this unit leaves running.
# Reload (SIGHUP) starts new workers (open connections stay on the old ones until they close
# or --graceful-timeout, 30 s, passes) and upgrades cmuxd-hub.service in place. A new token
# takes a restart: systemd copies LoadCredential= only at start.
[Unit]
Description=cmux remote daemon
Requires=cmuxd.socket
Wants=cmuxd-hub.service
After=cmuxd.socket cmuxd-hub.service
PropagatesReloadTo=cmuxd-hub.service

[Service]
Type=notify
{self._user()}ExecStart={exec_start}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
WatchdogSec={WATCHDOG_SEC}s
TimeoutStopSec=30s
# SIGTERM to the supervisor only: it drains and stops its workers itself.
KillMode=mixed
LoadCredential=relay-token:{unit_escape(str(self.token_file))}
{RUNTIME_DIRECTORY}LimitNOFILE=65536
UMask=0077

# Hardening: README, "Sandboxes", says why each line is or is not here.
{self.hardening()}
[Install]
{install}"""

    def hub_service(self) -> str:
        exec_start = " ".join([*(exec_quote(a) for a in self.command), "hub", "run",
                               "--state-dir=%t/cmuxd"])
        user = " --user" if not self.system else ""
        return f"""\
# cmux PTY hub: owns every PTY session and starts users' shells. Started with cmuxd.service
# and never stopped by it: `systemctl{user} restart cmuxd` leaves every session running;
# `systemctl{user} stop cmuxd-hub` ends every session on purpose.
# Reload (SIGHUP) re-executes the hub in place (same pid) into the code now installed,
# keeping its sessions; a reload of cmuxd.service propagates here.
# No sandbox: every option set here would reach the shells, as an ssh session's shell gets
# nothing of sshd's unit. Add --shell, --scrollback, --idle-ttl to ExecStart= to change
# those defaults.
[Unit]
Description=cmux PTY hub (every PTY session of cmuxd)

[Service]
Type=exec
{self._user()}ExecStart={exec_start}
ExecReload=/bin/kill -HUP $MAINPID
# After a crash, or a `cmuxd-remote hub stop`, a new hub serves new sessions.
Restart=always
RestartSec=1s
# The hub stores each session's PTY and scrollback here (3 fds a session), so that the next
# hub adopts every session of one that crashed, even by SIGKILL.
NotifyAccess=main
FileDescriptorStoreMax={FD_STORE_MAX}
# SIGTERM to the hub only: it hangs up every session (SIGHUP, then SIGKILL). As with sshd,
# what a session started in a session of its own (setsid, a daemon) outlives the stop, and
# the shells outlive a crash of the hub.
KillMode=process
TimeoutStopSec=30s
{RUNTIME_DIRECTORY}"""

    def hardening(self) -> str:
        """cmuxd.service's sandbox. The lines without a namespace also work in a user manager
        that cannot make one (no unprivileged user namespaces)."""
        lines = [
            "NoNewPrivileges=yes",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
            "RestrictRealtime=yes",
            "RestrictSUIDSGID=yes",
            "RestrictNamespaces=yes",
            "LockPersonality=yes",
            "MemoryDenyWriteExecute=yes",
            "SystemCallArchitectures=native",
            "SystemCallFilter=@system-service",
            "SystemCallFilter=~@privileged @resources",
            "SystemCallErrorNumber=EPERM",
        ]
        if self.system:
            lines += [
                "CapabilityBoundingSet=",
                "AmbientCapabilities=",
                "ProtectSystem=strict",
                "ReadWritePaths=%t/cmuxd",
                "ProtectHome=yes" if self.protect_home else
                "# The interpreter or cmuxd lives in a home directory: read-only, not hidden.\n"
                "ProtectHome=read-only",
                "PrivateTmp=yes",
                *(f"BindReadOnlyPaths={p}" for p in self.tmp_binds),
                "PrivateDevices=yes",
                "PrivateIPC=yes",
                "PrivateMounts=yes",
                "ProtectProc=invisible",
                "ProcSubset=pid",
                "ProtectKernelTunables=yes",
                "ProtectKernelModules=yes",
                "ProtectKernelLogs=yes",
                "ProtectControlGroups=yes",
                "ProtectClock=yes",
                "ProtectHostname=yes",
                "KeyringMode=private",
            ]
        return "\n".join(lines) + "\n"


def tailnet_dropin(addresses: list[str], port: int = DEFAULT_PORT, example: bool = False) -> str:
    listens = "\n".join(f"ListenStream={_bracket(a)}:{port}" for a in addresses)
    note = ""
    if example:
        note = ("# EXAMPLE: replace the address with this host's `tailscale ip -4`, or let\n"
                "# `cmuxd-remote units install --systemd --system --tailnet` write this file.\n")
    return f"""\
{note}# Also listen on this host's Tailscale address(es) (`tailscale ip`). FreeBind lets the socket
# come up at boot before tailscaled has assigned them.
[Unit]
After=tailscaled.service

[Socket]
{listens}
FreeBind=yes
"""


def render_plist(command: list[str], token_file: Path, socket_path: Path, log_file: Path,
                 port: int = DEFAULT_PORT, label: str = LAUNCHD_LABEL,
                 tailnet: bool = False) -> bytes:
    """A LaunchAgent: launchd listens on loopback TCP and a Unix socket (names "tcp" and
    "unix", which cmuxd asks launch_activate_socket for) and starts cmuxd on demand.

    With `tailnet`, "tcp" is every address, IPv4 and IPv6: launchd binds when the plist
    loads, before tailscaled has an address to bind, so cmuxd's --allow-from closes every
    peer outside the tailnet and loopback instead."""
    arguments = [*command, "serve", "--token-file", str(token_file)]
    tcp = {"SockNodeName": "127.0.0.1", "SockServiceName": str(port), "SockType": "stream",
           "SockFamily": "IPv4"}
    if tailnet:
        arguments += ["--allow-from", "tailnet,loopback"]
        tcp = {"SockServiceName": str(port), "SockType": "stream"}
    plist = {
        "Label": label,
        "ProgramArguments": arguments,
        "Sockets": {
            "tcp": tcp,
            "unix": {
                "SockPathName": str(socket_path),
                "SockPathMode": 0o600,  # plist integers are decimal: this is 384
                "SockType": "stream",
            },
        },
        "RunAtLoad": True,
        # Restart after a crash; after a clean exit launchd starts it on the next connection.
        "KeepAlive": {"SuccessfulExit": False},
        "ProcessType": "Interactive",
        "StandardOutPath": str(log_file),
        "StandardErrorPath": str(log_file),
    }
    return plistlib.dumps(plist, sort_keys=False)


def fleet_files() -> dict[str, str | bytes]:
    """What units/ holds: a system install at conventional paths, the same on every host (the
    tailnet drop-in and the plist are examples to adapt)."""
    units = SystemdUnits("system", FLEET_COMMAND, SYSTEM_TOKEN_FILE).render()
    units["cmuxd.socket.d/tailnet.conf"] = tailnet_dropin(["100.64.0.1"], example=True)
    home = Path("/Users/you")
    units["cmuxd.plist"] = render_plist(
        FLEET_COMMAND, home / ".config/cmuxd/relay-token", home / ".local/state/cmux/cmuxd.sock",
        home / "Library/Logs/cmuxd.log")
    return units


def write_fleet_files(directory: str) -> None:
    for name, content in fleet_files().items():
        path = Path(directory) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)


# Paths of this installation


def installed_command() -> list[str]:
    """The absolute cmuxd-remote of this installation: the script beside the interpreter (a
    venv or pipx install), else the one on PATH, else `python -P -m cmuxd`. The interpreter path
    is kept as is, not resolved: a venv's python symlink is what makes it the venv."""
    beside = Path(os.path.abspath(sys.executable)).parent / "cmuxd-remote"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("cmuxd-remote")
    if found:
        return [os.path.abspath(found)]
    # -P: nothing is imported from the unit's WorkingDirectory.
    return [os.path.abspath(sys.executable), "-P", "-m", "cmuxd"]


def _installation_paths(command: list[str]) -> list[str]:
    """What the service needs to see to start: the script, its interpreter, the package."""
    paths = [command[0], sys.executable, os.path.realpath(sys.executable),
             os.path.dirname(os.path.abspath(__file__))]
    interpreter = _shebang_interpreter(command[0])
    if interpreter:
        paths += [interpreter, os.path.realpath(interpreter)]
    return paths


def protect_home_is_safe(command: list[str], homes: list[str] = ()) -> bool:
    """Whether ProtectHome= would leave the daemon able to start: not if the script, its
    interpreter or the cmuxd package live in a home directory (pyenv, pipx, a checkout)."""
    paths = _installation_paths(command)
    prefixes = HOME_PREFIXES + tuple(h.rstrip("/") + "/" for h in homes if h and h != "/")
    return not any(os.path.abspath(p).startswith(prefixes) for p in paths)


def paths_under_tmp(command: list[str]) -> list[str]:
    """Top directories under /tmp or /var/tmp that hold the script, its interpreter or the
    cmuxd package: PrivateTmp= would hide them, so the unit binds them back read-only."""
    found = set()
    for path in _installation_paths(command):
        parts = Path(os.path.abspath(path)).parts
        for depth, tmp in ((2, ("/", "tmp")), (3, ("/", "var", "tmp"))):
            if parts[:depth] == tmp and len(parts) > depth:
                found.add(str(Path(*parts[:depth + 1])))
    return sorted(found)


def _shebang_interpreter(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].strip().split()
    return parts[0].decode(errors="replace") if parts else None


def tailscale_addresses() -> list[str]:
    found = tailscale_cli_addresses()
    if found is None:
        raise UnitsError("`tailscale ip` is not installed here or failed; pass the addresses "
                         "with --tailnet-address ADDR")
    if not found:
        raise UnitsError("`tailscale ip` printed no address (is tailscaled up and logged in?); "
                         "pass --tailnet-address ADDR")
    return [str(address) for address in found]


def sudo_user() -> str | None:
    """The person behind a command run through sudo, or None."""
    if os.geteuid() == 0:
        return os.environ.get("SUDO_USER") or None
    return None


# Installing


@dataclass
class Installed:
    files: dict[Path, str | bytes]  # what was (or, with --print, would be) written
    token_file: Path
    token_created: bool
    next_steps: list[str]


def systemd_plan(mode: str, *, user: str | None = None, token_file: str | None = None,
                 port: int = DEFAULT_PORT, tailnet: list[str] | None = None,
                 at_boot: bool = False) -> Installed:
    """System units always start at boot (a fleet wants the daemon up, not only on demand);
    user units only with `at_boot`, since a user manager runs only while its user is logged
    in, unless lingering is on."""
    if mode not in ("user", "system"):
        raise UnitsError("choose --user (your own systemd instance) or --system")
    command = installed_command()
    if mode == "system":
        user = user or sudo_user()
        if user is None:
            raise UnitsError("say which account the daemon and the shells it serves run as: "
                             "--as USER (--as root only if you mean root)")
        try:
            account = pwd.getpwnam(user)
        except KeyError:
            raise UnitsError(f"there is no user {user!r} here; pass --as an existing "
                             "account") from None
        homes = [account.pw_dir, pwd.getpwuid(os.getuid()).pw_dir]
        unit_dir = SYSTEM_UNIT_DIR
        token = Path(token_file) if token_file else SYSTEM_TOKEN_FILE
        steps = ["systemctl daemon-reload", "systemctl enable --now cmuxd.socket cmuxd.service"]
    else:
        if user is not None:
            raise UnitsError("--as applies to --system units; a --user unit runs as you")
        homes = [str(Path.home())]
        unit_dir = config_home() / "systemd" / "user"
        token = Path(token_file) if token_file else default_token_path()
        steps = ["systemctl --user daemon-reload"]
        if at_boot:
            steps += ["systemctl --user enable --now cmuxd.socket cmuxd.service",
                      f"loginctl enable-linger {pwd.getpwuid(os.getuid()).pw_name}"
                      "    # your manager starts at boot, not at login"]
        else:
            steps += ["systemctl --user enable --now cmuxd.socket"]
    units = SystemdUnits(mode, command, token.absolute(), user=user, port=port,
                         protect_home=protect_home_is_safe(command, homes),
                         tmp_binds=paths_under_tmp(command), tailnet=list(tailnet or []),
                         at_boot=at_boot)
    files: dict[Path, str | bytes] = {unit_dir / name: text
                                      for name, text in units.render().items()}
    return Installed(files, token.absolute(), False, steps)


def launchd_plan(*, token_file: str | None = None, port: int = DEFAULT_PORT,
                 tailnet: bool = False) -> Installed:
    home = Path.home()
    token = Path(token_file).absolute() if token_file else default_token_path()
    plist_path = home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    data = render_plist(installed_command(), token, *launchd_paths(home), port,
                        tailnet=tailnet)
    steps = [f"launchctl bootstrap gui/{os.getuid()} {plist_path}"]
    return Installed({plist_path: data}, token, False, steps)


def install(plan: Installed, *, mkdirs: list[Path] = ()) -> Installed:
    """Write the files of a plan; create the token (0600) when it does not exist yet."""
    try:
        if not plan.token_file.exists():
            write_new_token(plan.token_file)
            plan.token_created = True
        for directory in mkdirs:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path, content in plan.files.items():
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            data = content.encode() if isinstance(content, str) else content
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
    except PermissionError as exc:
        raise UnitsError(f"cannot write {exc.filename}: permission denied; system units need "
                         "root (sudo), or install --user units") from None
    return plan


def launchd_paths(home: Path) -> tuple[Path, Path]:
    """The agent's Unix socket and log file."""
    return (home / ".local" / "state" / "cmux" / "cmuxd.sock",
            home / "Library" / "Logs" / "cmuxd.log")


def launchd_dirs() -> list[Path]:
    """Directories launchd will not create: the Unix socket's and the log's."""
    return [path.parent for path in launchd_paths(Path.home())]


# systemd syntax


def unit_escape(value: str) -> str:
    """A literal for a unit-file value: % would start a specifier."""
    return value.replace("%", "%%")


def exec_quote(arg: str) -> str:
    """One ExecStart= word: specifiers escaped, quoted when it holds spaces or quotes."""
    arg = unit_escape(arg)
    if arg and not any(c in arg for c in " \t\"'\\;$"):
        return arg
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$")
    return f'"{escaped}"'


def _bracket(address: str) -> str:
    return f"[{address}]" if ":" in address else address


# Nix: the same units as data, for the flake's modules


# What nix/lib.nix substitutes: each stands for one setting of the module. All are strings, the
# port too: the renderers only format them.
NIX_PLACEHOLDERS = {
    "command": "@command@",
    "token_file": "@tokenFile@",
    "user": "@user@",
    "port": "@port@",
    "serve_args": "@serveArgs@",
    "tailnet_address": "@tailnetAddress@",
    "home": "@home@",
}


def unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    """A rendered unit's settings, {section: {key: [values in order]}}, comments dropped: what
    NixOS and home-manager take, read back from the text `units install` writes so that every
    unit the renderer adds reaches the modules unchanged."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif current is not None and "=" in line and not line.endswith("\\"):
            key, value = line.split("=", 1)
            current.setdefault(key.strip(), []).append(value.strip())
        else:
            raise UnitsError(f"line {number} of a rendered unit is not a KEY=VALUE setting "
                             f"of a section: {raw!r}; the renderer must write plain settings")
    return sections


def nix_units() -> dict:
    """What nix/units.json holds: every systemd unit of a system install, of a user install
    (on demand and at boot) and the launchd agent (loopback and tailnet), rendered by the
    functions above with placeholders in place of the module's settings."""
    p = NIX_PLACEHOLDERS

    def systemd(mode: str, at_boot: bool = False) -> list[dict]:
        plain = SystemdUnits(mode, [p["command"]], Path(p["token_file"]),
                             user=p["user"] if mode == "system" else None,
                             port=p["port"], serve_args=[p["serve_args"]], at_boot=at_boot)
        without_tailnet = plain.render()
        with_tailnet = replace(plain, tailnet=[p["tailnet_address"]]).render()
        return [{"name": name, "tailnet_only": name not in without_tailnet,
                 "sections": unit_sections(text)} for name, text in with_tailnet.items()]

    def launchd(tailnet: bool) -> dict:
        return plistlib.loads(render_plist([p["command"]], Path(p["token_file"]),
                                           *launchd_paths(Path(p["home"])), p["port"],
                                           tailnet=tailnet))

    return {
        "systemd": {"system": systemd("system"), "user": systemd("user"),
                    "user-at-boot": systemd("user", at_boot=True)},
        "launchd": {"loopback": launchd(False), "tailnet": launchd(True)},
    }


def nix_units_json() -> bytes:
    return orjson.dumps(nix_units(), option=orjson.OPT_INDENT_2) + b"\n"


if __name__ == "__main__":  # regenerate units/ and nix/units.json: python -m cmuxd.units
    write_fleet_files(sys.argv[1] if len(sys.argv) > 1 else "units")
    Path(sys.argv[2] if len(sys.argv) > 2 else "nix/units.json").write_bytes(nix_units_json())
