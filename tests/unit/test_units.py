"""Service units: the launchd plist against launchd.plist(5), the systemd units against
`systemd-analyze verify`, the install command in a throw-away home, and the code path of a
process that launchd did not start."""

from __future__ import annotations

import os
import plistlib
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cmuxd import units
from cmuxd.supervisor import activation

REPO = Path(__file__).resolve().parents[2]
ANALYZE = shutil.which("systemd-analyze")


def cli(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("XDG_CONFIG_HOME", "SUDO_USER", "CMUX_RELAY_TOKEN")}
    full_env.update(HOME=str(home), **env)
    return subprocess.run([sys.executable, "-m", "cmuxd", *args], capture_output=True,
                          text=True, env=full_env, timeout=60)


# launchd


def test_plist_has_the_keys_and_types_launchd_requires(tmp_path):
    token = tmp_path / "relay-token"
    sock = tmp_path / "state" / "cmuxd.sock"
    log = tmp_path / "cmuxd.log"
    plist = plistlib.loads(units.render_plist(["/opt/cmuxd/bin/cmuxd-remote"], token, sock, log,
                                              port=6001))
    assert isinstance(plist["Label"], str) and plist["Label"]
    args = plist["ProgramArguments"]
    assert all(isinstance(a, str) for a in args)
    assert args[0] == "/opt/cmuxd/bin/cmuxd-remote" and args[1] == "serve"
    assert args[args.index("--token-file") + 1] == str(token)
    # cmuxd asks launch_activate_socket for exactly these names.
    assert set(plist["Sockets"]) == set(activation.LAUNCHD_SOCKET_NAMES)
    tcp = plist["Sockets"]["tcp"]
    assert tcp == {"SockNodeName": "127.0.0.1", "SockServiceName": "6001",
                   "SockType": "stream", "SockFamily": "IPv4"}
    unix = plist["Sockets"]["unix"]
    assert unix["SockPathName"] == str(sock) and unix["SockType"] == "stream"
    # plist integers are decimal: 0600 must be written as 384, or launchd reads mode 01130.
    assert type(unix["SockPathMode"]) is int and unix["SockPathMode"] == 384
    assert b"<integer>384</integer>" in units.render_plist(["/x"], token, sock, log)
    assert plist["RunAtLoad"] is True
    assert isinstance(plist["KeepAlive"], (bool, dict))
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == str(log)
    for key, value in plist.items():
        assert key in LAUNCHD_PLIST_KEYS, f"{key} is not a launchd.plist(5) key"


LAUNCHD_PLIST_KEYS = {"Label", "ProgramArguments", "Sockets", "RunAtLoad", "KeepAlive",
                      "ProcessType", "StandardOutPath", "StandardErrorPath"}


def test_install_launchd_writes_plist_token_and_directories(tmp_path):
    result = cli("units", "install", "--launchd", home=tmp_path)
    assert result.returncode == 0, result.stderr
    plist_path = tmp_path / "Library" / "LaunchAgents" / f"{units.LAUNCHD_LABEL}.plist"
    plist = plistlib.loads(plist_path.read_bytes())
    token = Path(plist["ProgramArguments"][plist["ProgramArguments"].index("--token-file") + 1])
    assert token == tmp_path / ".config" / "cmuxd" / "relay-token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert os.path.isabs(plist["ProgramArguments"][0])
    assert os.access(plist["ProgramArguments"][0], os.X_OK)
    sock_dir = Path(plist["Sockets"]["unix"]["SockPathName"]).parent
    assert sock_dir.is_dir() and stat.S_IMODE(sock_dir.stat().st_mode) == 0o700
    assert Path(plist["StandardErrorPath"]).parent.is_dir()
    assert f"launchctl bootstrap gui/{os.getuid()} {plist_path}" in result.stdout
    assert token.read_text().strip() not in result.stdout + result.stderr


def test_print_launchd_is_one_plist_and_installs_nothing(tmp_path):
    result = cli("units", "install", "--launchd", "--print", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert plistlib.loads(result.stdout.encode())["Label"] == units.LAUNCHD_LABEL
    assert not any(tmp_path.iterdir())


def test_not_started_by_launchd():
    # Off macOS there is no launchd; on macOS, outside launchd, the call answers ESRCH. Both
    # mean the same: no activated sockets, so the daemon binds its own.
    assert activation.launch_activate_socket("tcp") is None
    assert activation.launchd_listeners() is None
    probe = ("import os; [os.environ.pop(k, None) for k in ('LISTEN_FDS', 'LISTEN_PID')]; "
             "from cmuxd.supervisor.activation import activated_listeners; "
             "print(activated_listeners())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.strip() == "None", out.stderr


# systemd


def render(mode="user", **kwargs) -> dict[str, str]:
    kwargs.setdefault("command", units.installed_command())
    kwargs.setdefault("token_file", Path("/etc/cmuxd/relay-token"))
    return units.SystemdUnits(mode, **kwargs).render()


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_socket_unit_listens_on_loopback_and_a_private_unix_socket():
    socket_unit = lines(render(port=6002)["cmuxd.socket"])
    for line in ("ListenStream=127.0.0.1:6002", "ListenStream=%t/cmuxd/cmuxd.sock",
                 "FileDescriptorName=cmuxd", "SocketMode=0600", "Accept=no",
                 "DirectoryMode=0700", "WantedBy=sockets.target"):
        assert line in socket_unit
    assert not any(line.startswith("SocketUser=") for line in socket_unit)


def test_service_unit_essentials():
    service = lines(render()["cmuxd.service"])
    exec_start = next(line for line in service if line.startswith("ExecStart="))
    assert exec_start.split("=", 1)[1].split()[0] == units.installed_command()[0]
    assert os.path.isabs(units.installed_command()[0])
    assert exec_start.endswith(" serve --state-dir=%t/cmuxd --external-hub")
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                 f"WatchdogSec={units.WATCHDOG_SEC}s", "Requires=cmuxd.socket",
                 "LoadCredential=relay-token:/etc/cmuxd/relay-token", "NoNewPrivileges=yes",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "Also=cmuxd.socket"):
        assert line in service


def test_user_units_need_no_namespaces_and_system_units_carry_them():
    user = lines(render("user")["cmuxd.service"])
    system = lines(render("system", user="nobody")["cmuxd.service"])
    namespaced = ("ProtectSystem=strict", "PrivateTmp=yes", "PrivateDevices=yes",
                  "ProtectProc=invisible", "ProcSubset=pid", "ProtectKernelTunables=yes",
                  "ProtectControlGroups=yes", "ProtectHome=yes", "CapabilityBoundingSet=")
    for line in namespaced:
        assert line not in user
        assert line in system
    for line in ("SystemCallFilter=@system-service", "MemoryDenyWriteExecute=yes",
                 "RestrictNamespaces=yes", "NoNewPrivileges=yes"):
        assert line in user and line in system
    assert "User=nobody" in system
    assert "SocketUser=nobody" in lines(render("system", user="nobody")["cmuxd.socket"])
    assert "DirectoryMode=0755" in lines(render("system", user="nobody")["cmuxd.socket"])
    assert not any(line.startswith("User=") for line in user)


def test_home_is_hidden_unless_what_the_daemon_runs_lives_in_one():
    service = lines(render("system", user="nobody", protect_home=False)["cmuxd.service"])
    assert "ProtectHome=read-only" in service and "ProtectHome=yes" not in service
    assert not units.protect_home_is_safe(["/home/alice/.local/bin/cmuxd-remote"])
    assert not units.protect_home_is_safe(["/srv/people/alice/bin/cmuxd-remote"],
                                          homes=["/srv/people/alice"])


def test_exec_start_quotes_paths_and_escapes_specifiers():
    assert units.exec_quote("/opt/cmuxd/bin/cmuxd-remote") == "/opt/cmuxd/bin/cmuxd-remote"
    assert units.exec_quote("/opt/my tools/cmuxd-remote") == '"/opt/my tools/cmuxd-remote"'
    assert units.exec_quote("/opt/100%/x") == "/opt/100%%/x"
    assert units.exec_quote('/a"b$c') == '"/a\\"b$$c"'
    service = render(token_file=Path("/etc/50%/relay-token"))["cmuxd.service"]
    assert "LoadCredential=relay-token:/etc/50%%/relay-token" in service


def test_tailnet_dropin_binds_the_given_addresses_with_freebind():
    dropin = lines(render(tailnet=["100.64.1.2", "fd7a:115c:a1e0::2"], port=6003)
                   ["cmuxd.socket.d/tailnet.conf"])
    assert dropin == ["[Unit]", "After=tailscaled.service", "[Socket]",
                      "ListenStream=100.64.1.2:6003", "ListenStream=[fd7a:115c:a1e0::2]:6003",
                      "FreeBind=yes"]


def test_units_directory_matches_the_renderer():
    """units/ is what a fleet copies; regenerate it with `python -m cmuxd.units units`."""
    expected = units.fleet_files()
    on_disk = {str(p.relative_to(REPO / "units")): p.read_bytes()
               for p in (REPO / "units").rglob("*") if p.is_file()}
    assert set(on_disk) == set(expected)
    for name, content in expected.items():
        data = content.encode() if isinstance(content, str) else content
        assert on_disk[name] == data, f"units/{name} is stale: python -m cmuxd.units units"


def analyze_verify(directory: Path, *names: str, user: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="notice")
    args = [ANALYZE, "verify"]
    if user:
        runtime = directory / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
        args.append("--user")
    return subprocess.run([*args, *(str(directory / n) for n in names)], capture_output=True,
                          text=True, env=env, timeout=60)


@pytest.mark.parametrize("mode", ["user", "system"])
def test_systemd_analyze_verify_passes(tmp_path, mode):
    if ANALYZE is None:
        print("systemd-analyze is not installed (apt: systemd); units not verified")
        pytest.skip("systemd-analyze is not installed (apt: systemd)")
    rendered = render(mode, user="root" if mode == "system" else None,
                      tailnet=["100.64.1.2"], at_boot=True)
    for name, text in rendered.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    # The drop-in beside cmuxd.socket is loaded with it, so it is verified too.
    result = analyze_verify(tmp_path, "cmuxd.socket", "cmuxd.service", "cmuxd-hub.service",
                            user=mode == "user")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # unknown keys are only warnings: none allowed


def test_install_systemd_user_writes_units_and_token(tmp_path):
    result = cli("units", "install", "--systemd", "--user", home=tmp_path)
    assert result.returncode == 0, result.stderr
    unit_dir = tmp_path / ".config" / "systemd" / "user"
    token = tmp_path / ".config" / "cmuxd" / "relay-token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    service = (unit_dir / "cmuxd.service").read_text()
    assert f"LoadCredential=relay-token:{token}" in service
    assert (unit_dir / "cmuxd.socket").exists()
    assert "systemctl --user enable --now cmuxd.socket" in result.stdout
    assert token.read_text().strip() not in result.stdout + result.stderr + service
    # A second install keeps the token clients already hold.
    before = token.read_bytes()
    assert cli("units", "install", "--systemd", "--user", home=tmp_path).returncode == 0
    assert token.read_bytes() == before


def test_print_systemd_system_as_user(tmp_path):
    result = cli("units", "install", "--systemd", "--system", "--as", "nobody", "--print",
                 "--tailnet-address", "100.64.1.3", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "# /etc/systemd/system/cmuxd.service" in result.stdout
    assert "\nUser=nobody\n" in result.stdout
    assert "# /etc/systemd/system/cmuxd.socket.d/tailnet.conf" in result.stdout
    assert "ListenStream=100.64.1.3:5555" in result.stdout
    assert not any(tmp_path.iterdir())


def test_install_refuses_unclear_requests(tmp_path):
    for args, message in [
        (["--systemd"], "choose one of --user and --system"),
        (["--systemd", "--launchd"], "choose one of --systemd and --launchd"),
        (["--systemd", "--system", "--as", "no-such-user-here", "--print"], "no user"),
        (["--systemd", "--user", "--as", "root", "--print"], "--as applies to --system"),
        (["--systemd", "--system", "--print"], "--as USER (--as root only if you mean root)"),
    ]:
        result = cli("units", "install", *args, home=tmp_path)
        assert result.returncode != 0
        assert message in result.stderr, result.stderr


def test_files_under_tmp_are_bound_back_into_the_private_tmp(tmp_path):
    script = Path("/tmp/checkout-x/.venv/bin/cmuxd-remote")
    binds = units.paths_under_tmp([str(script)])
    assert "/tmp/checkout-x" in binds
    assert all(b.startswith(("/tmp/", "/var/tmp/")) and b.count("/") == (2 if b.startswith("/tmp/") else 3)
               for b in binds)
    text = units.SystemdUnits("system", [str(script)], Path("/etc/cmuxd/relay-token"),
                              tmp_binds=binds).render()["cmuxd.service"]
    assert "PrivateTmp=yes" in text and "BindReadOnlyPaths=/tmp/checkout-x" in text


def install_section(text: str) -> list[str]:
    return lines(text.split("[Install]", 1)[1])


def test_system_service_starts_at_boot_and_user_service_on_demand():
    assert install_section(render("system")["cmuxd.service"]) == [
        "WantedBy=multi-user.target", "Also=cmuxd.socket"]
    assert install_section(render("user")["cmuxd.service"]) == ["Also=cmuxd.socket"]
    assert install_section(render("user", at_boot=True)["cmuxd.service"]) == [
        "WantedBy=default.target", "Also=cmuxd.socket"]
    # The socket is enabled either way: it holds the port across restarts.
    for mode in ("user", "system"):
        assert install_section(render(mode)["cmuxd.socket"]) == ["WantedBy=sockets.target"]


def test_install_next_steps_enable_what_starts_at_boot(tmp_path):
    system = cli("units", "install", "--systemd", "--system", "--as", "nobody", "--print",
                 home=tmp_path)
    assert system.returncode == 0, system.stderr
    assert "WantedBy=multi-user.target" in system.stdout
    on_demand = cli("units", "install", "--systemd", "--user", home=tmp_path)
    assert on_demand.returncode == 0, on_demand.stderr
    assert "systemctl --user enable --now cmuxd.socket\n" in on_demand.stdout
    assert "linger" not in on_demand.stdout
    at_boot = cli("units", "install", "--systemd", "--user", "--at-boot", home=tmp_path)
    assert at_boot.returncode == 0, at_boot.stderr
    assert "systemctl --user enable --now cmuxd.socket cmuxd.service" in at_boot.stdout
    assert "loginctl enable-linger" in at_boot.stdout
    service = tmp_path / ".config" / "systemd" / "user" / "cmuxd.service"
    assert "WantedBy=default.target" in service.read_text()


def test_at_boot_applies_to_systemd_only(tmp_path):
    result = cli("units", "install", "--launchd", "--at-boot", "--print", home=tmp_path)
    assert result.returncode == 2
    assert "--at-boot apply to --systemd" in result.stderr
    assert not any(tmp_path.iterdir())


def test_the_hub_unit_outlives_the_daemon_and_carries_no_sandbox():
    """Users' shells are the hub's children: whatever sandbox its unit has, they have. And a
    restart of cmuxd.service must not reach it, while a reload upgrades both. Its fd store
    and KillMode=process carry the sessions through a crash of the hub."""
    for mode in ("user", "system"):
        rendered = render(mode, user="alice" if mode == "system" else None)
        hub, service = lines(rendered["cmuxd-hub.service"]), lines(rendered["cmuxd.service"])
        exec_start = next(line for line in hub if line.startswith("ExecStart="))
        assert exec_start.endswith(" hub run --state-dir=%t/cmuxd")
        for line in ("ExecReload=/bin/kill -HUP $MAINPID", "KillMode=process",
                     "NotifyAccess=main", "FileDescriptorStoreMax=3072",
                     "RuntimeDirectory=cmuxd", "RuntimeDirectoryPreserve=yes"):
            assert line in hub
        assert ("User=alice" in hub) == (mode == "system")
        sandbox = ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "ProtectSystem",
                   "PrivateDevices", "ProtectProc", "ProcSubset", "SystemCallFilter",
                   "CapabilityBoundingSet", "RestrictSUIDSGID", "RestrictNamespaces",
                   "RestrictAddressFamilies", "MemoryDenyWriteExecute", "PrivateIPC", "UMask",
                   "ProtectKernel", "ProtectControlGroups", "ProtectClock", "LockPersonality")
        assert not [line for line in hub if line.startswith(sandbox)]
        assert not [line for line in hub if line.startswith(("BindsTo=", "PartOf=", "Requires=",
                                                              "StopPropagatedFrom="))]
        for line in ("Wants=cmuxd-hub.service", "PropagatesReloadTo=cmuxd-hub.service"):
            assert line in service
        assert "cmuxd-hub.service" in next(l for l in service if l.startswith("After="))
        # Both keep the state directory when they stop: neither may pull it from the other.
        for unit in (hub, service):
            assert "RuntimeDirectoryPreserve=yes" in unit and "RuntimeDirectoryMode=0700" in unit


def test_system_install_without_as_names_the_sudo_user_or_refuses(tmp_path):
    """No root daemon unless asked for: without --as, a --system install takes SUDO_USER
    (under sudo) and otherwise stops; --as root is honoured when given."""
    refused = cli("units", "install", "--systemd", "--system", home=tmp_path)
    assert refused.returncode == 1
    assert "--as USER" in refused.stderr and "Traceback" not in refused.stderr
    assert not any(tmp_path.iterdir())
    root = cli("units", "install", "--systemd", "--system", "--as", "root", "--print",
               home=tmp_path)
    assert root.returncode == 0, root.stderr
    assert root.stdout.count("\nUser=root\n") == 2  # the daemon and the hub
    if os.geteuid() == 0:
        sudo = cli("units", "install", "--systemd", "--system", "--print", home=tmp_path,
                   SUDO_USER="nobody")
        assert sudo.returncode == 0, sudo.stderr
        assert sudo.stdout.count("\nUser=nobody\n") == 2


def security_score(unit: Path) -> float:
    result = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, SYSTEMD_LOG_LEVEL="err"))
    for line in result.stdout.splitlines():
        if "Overall exposure level" in line:
            return float(line.split(":", 1)[1].split()[0])
    raise AssertionError(f"no score in systemd-analyze security's output:\n"
                         f"{result.stdout}{result.stderr}")


@pytest.mark.parametrize("user", ["alice", "root"])
def test_the_network_facing_system_unit_scores_at_most_4(tmp_path, user):
    """`systemd-analyze security --offline=yes`: 0 is locked down, 10 is exposed."""
    if ANALYZE is None:
        print("systemd-analyze is not installed (apt: systemd); sandbox not scored")
        pytest.skip("systemd-analyze is not installed (apt: systemd)")
    for protect_home in (True, False):
        unit = tmp_path / "cmuxd.service"
        unit.write_text(render("system", user=user, protect_home=protect_home)["cmuxd.service"])
        score = security_score(unit)
        print(f"cmuxd.service --system, User={user}, protect_home={protect_home}: {score}")
        assert score <= 4.0
