"""The flake's builtins-only part (nix/lib.nix), evaluated by Debian's nix-bin: what it makes
of nix/units.json must be what `cmuxd-remote units install --print` writes. The modules and
the package need nixpkgs, which is not here: they are only parsed."""

from __future__ import annotations

import json
import os
import plistlib
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import cmuxd
from cmuxd import units

REPO = Path(__file__).resolve().parents[2]
NIX_INSTANTIATE = shutil.which("nix-instantiate")

pytestmark = pytest.mark.skipif(NIX_INSTANTIATE is None,
                                reason="nix-instantiate is not installed (apt: nix-bin)")


@pytest.fixture(scope="module")
def nix_env(tmp_path_factory) -> dict[str, str]:
    """A private store and state directory: no daemon, nothing written outside tmp."""
    root = tmp_path_factory.mktemp("nix")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
    env.update(NIX_STORE_DIR=str(root / "store"), NIX_STATE_DIR=str(root / "state"),
               NIX_LOG_DIR=str(root / "log"), NIX_CONF_DIR=str(root / "conf"),
               NIX_CONFIG="build-users-group =")
    return env


def nix_run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([NIX_INSTANTIATE, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60)


def nix_evaluate(env: dict[str, str], expression: str, value) -> subprocess.CompletedProcess:
    """EXPRESSION evaluated with `lib` (nix/lib.nix) and `value`, a JSON-like Python value."""
    return nix_run(env, "--eval", "--strict", "--json", "--argstr", "value", json.dumps(value),
                   "--expr", "{ value }: let lib = import ./nix/lib.nix { }; "
                   f"value' = builtins.fromJSON value; in {expression}")


def nix_eval(env: dict[str, str], expression: str, value=None):
    result = nix_evaluate(env, expression, value)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def nix_error(env: dict[str, str], expression: str, value=None) -> str:
    result = nix_evaluate(env, expression, value)
    assert result.returncode != 0, result.stdout
    return result.stderr


def cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_CONFIG_HOME", "SUDO_USER", "CMUX_RELAY_TOKEN")}
    env["HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "cmuxd", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def printed_files(stdout: str, unit_dir: Path) -> dict[str, str]:
    """`units install --print` output split at its `# /unit/dir/NAME` headers."""
    files: dict[str, list[str]] = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith(f"# {unit_dir}/"):
            current = files.setdefault(line[len(f"# {unit_dir}/"):], [])
        else:
            current.append(line)
    return {name: "\n".join(text) for name, text in files.items()}


def canonical(text: str) -> str:
    """Unit text as nix/lib.nix writes it: no comments, sections and keys in sorted order,
    the values of one key in their order."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line[1:-1], [])
        else:
            current.append(line)
    return "\n".join(f"[{name}]\n" + "".join(
        f"{line}\n" for line in sorted(sections[name], key=lambda l: l.split("=", 1)[0]))
        for name in sorted(sections))


def test_units_json_matches_the_renderer():
    """nix/units.json is what the modules read; `python -m cmuxd.units` regenerates it."""
    assert (REPO / "nix" / "units.json").read_bytes() == units.nix_units_json(), \
        "nix/units.json is stale: python -m cmuxd.units (in the repository's root)"


def test_every_nix_file_parses(nix_env):
    files = [REPO / "flake.nix", *sorted((REPO / "nix").glob("*.nix"))]
    assert {f.name for f in files} >= {"flake.nix", "lib.nix", "nixos.nix", "darwin.nix",
                                       "home-manager.nix", "package.nix", "options.nix"}
    for path in files:
        result = nix_run(nix_env, "--parse", str(path))
        assert result.returncode == 0, f"{path.name}: {result.stderr}"


def test_no_flake_lock_is_checked_in():
    assert not (REPO / "flake.lock").exists()


SETTINGS = {"port": 6011, "tokenFile": "/etc/cmuxd/50%/relay-token",
            "tailnetAddresses": ["100.64.1.3", "fd7a:115c:a1e0::3"]}


def print_args(settings: dict) -> list[str]:
    args = ["--print", "--port", str(settings["port"]), "--token-file", settings["tokenFile"]]
    for address in settings["tailnetAddresses"]:
        args += ["--tailnet-address", address]
    return args


def nix_unit_files(env: dict[str, str], mode: str, **settings) -> dict[str, str]:
    arguments = dict(settings, mode=mode, command=units.installed_command(),
                     executables={"/bin/kill": "/bin/kill"})
    return nix_eval(env, "lib.unitFiles value'", arguments)


@pytest.mark.parametrize("at_boot", [False, True])
def test_nix_renders_the_user_units_of_units_install(tmp_path, nix_env, at_boot):
    result = cli("units", "install", "--systemd", "--user", *print_args(SETTINGS),
                 *(["--at-boot"] if at_boot else []), home=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = printed_files(result.stdout, tmp_path / ".config" / "systemd" / "user")
    assert {"cmuxd.socket", "cmuxd.service", "cmuxd.socket.d/tailnet.conf"} <= set(printed)
    rendered = nix_unit_files(nix_env, "user-at-boot" if at_boot else "user", **SETTINGS)
    assert rendered == {name: canonical(text) for name, text in printed.items()}


def test_nix_renders_the_system_units_of_units_install(tmp_path, nix_env):
    """ProtectHome= and BindReadOnlyPaths= of `--print` follow where this checkout lives; a
    store path is in neither a home nor /tmp: the Nix units say what the renderer says then."""
    result = cli("units", "install", "--systemd", "--system", "--as", "nobody",
                 *print_args(SETTINGS), home=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = printed_files(result.stdout, units.SYSTEM_UNIT_DIR)
    rendered = nix_unit_files(nix_env, "system", user="nobody", **SETTINGS)
    assert set(rendered) == set(printed)
    placed = re.compile(r"^(ProtectHome|BindReadOnlyPaths)=.*\n", re.M)
    for name, text in printed.items():
        assert placed.sub("", rendered[name]) == placed.sub("", canonical(text)), name
    service = rendered["cmuxd.service"].splitlines()
    outside_homes = units.SystemdUnits("system", ["/x"], Path("/t"), user="nobody").service()
    protect_home = [line for line in outside_homes.splitlines()
                    if line.startswith("ProtectHome=")]
    assert protect_home and [line for line in service
                             if line.startswith("ProtectHome=")] == protect_home
    assert not any(line.startswith("BindReadOnlyPaths=") for line in service)
    assert "User=nobody" in service
    assert "LoadCredential=relay-token:/etc/cmuxd/50%%/relay-token" in service


def test_nix_leaves_out_the_tailnet_dropin_without_addresses(nix_env):
    rendered = nix_unit_files(nix_env, "system", user="alice", port=5555,
                              tokenFile="/etc/cmuxd/relay-token", tailnetAddresses=[])
    assert "cmuxd.socket" in rendered and "cmuxd.socket.d/tailnet.conf" not in rendered
    merged = nix_eval(nix_env, "lib.mergeDropins (lib.systemdUnits value')",
                      dict(mode="system", user="alice", command=["/x"], tokenFile="/t",
                           tailnetAddresses=["100.64.1.3"]))
    assert "cmuxd.socket" in merged and not any(".d/" in name for name in merged)
    socket = merged["cmuxd.socket"]
    assert socket["Socket"]["ListenStream"] == ["127.0.0.1:5555", "%t/cmuxd/cmuxd.sock",
                                                "100.64.1.3:5555"]
    assert socket["Socket"]["FreeBind"] == ["yes"]
    assert socket["Unit"]["After"] == ["tailscaled.service"]


def test_nix_serve_arguments_are_quoted_as_the_renderer_quotes_them(nix_env):
    tricky = ["/opt/my tools/cmuxd-remote", "/opt/100%/x", '/a"b$c', "", "plain",
              "$(touch /tmp/x)", "a;b", "back\\slash", "it's"]
    assert nix_eval(nix_env, "map lib.execQuote value'", tricky) == [
        units.exec_quote(arg) for arg in tricky]
    rendered = nix_unit_files(nix_env, "user", port=5555, tokenFile="/t", tailnetAddresses=[],
                              serveArgs=["--allow-from", "tailnet", "--workers", "$(id)"])
    exec_start = next(line for line in rendered["cmuxd.service"].splitlines()
                      if line.startswith("ExecStart="))
    assert exec_start.endswith(' --allow-from tailnet --workers "$$(id)"')


@pytest.mark.parametrize("tailnet", [False, True])
def test_nix_launchd_agent_is_the_plist_of_units_install(tmp_path, nix_env, tailnet):
    token = tmp_path / "token dir" / "relay-token"
    result = cli("units", "install", "--launchd", "--print", "--port", "6012",
                 "--token-file", str(token), *(["--tailnet"] if tailnet else []),
                 home=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = plistlib.loads(result.stdout.encode())
    agent = nix_eval(nix_env, "lib.launchdAgent value'", dict(
        command=units.installed_command(), tokenFile=str(token), home=str(tmp_path),
        port=6012, tailnet=tailnet))
    assert agent == printed
    with_args = nix_eval(nix_env, "lib.launchdAgent value'", dict(
        command=["/x"], tokenFile="/t", home="/Users/a", serveArgs=["--workers", "2"]))
    assert with_args["ProgramArguments"][-2:] == ["--workers", "2"]


BAD_SETTINGS = [
    ({"port": 0}, "port must be a number from 1 to 65535"),
    ({"port": "80"}, "port must be a number from 1 to 65535"),
    ({"user": "alice\nExecStartPre=/bin/sh"}, "user must be the name of an account"),
    ({"user": None}, "user must be the name of an account"),
    ({"tokenFile": "relay-token"}, "tokenFile must be an absolute path on one line"),
    ({"tokenFile": "/t\nExecStartPre=/bin/sh"},
     "tokenFile must be an absolute path on one line"),
    ({"tailnetAddresses": ["100.64.0.1 0.0.0.0"]},
     'tailnet address "100.64.0.1 0.0.0.0" is not an IP address'),
    ({"serveArgs": ["--workers", "2\nExecStartPre=/bin/sh -c id"]},
     "an argument holds a line break"),
]


@pytest.mark.parametrize("bad,message", BAD_SETTINGS)
def test_nix_refuses_settings_that_would_change_the_units_meaning(nix_env, bad, message):
    settings = dict(SETTINGS, mode="system", command=["/x"], user="alice")
    settings.update(bad)
    error = nix_error(nix_env, "lib.unitFiles value'", settings)
    assert "cmuxd: " + message in error, error


def test_nix_refuses_a_token_given_as_a_path_literal(nix_env):
    """A path literal would be copied into the world-readable store, token and all."""
    error = nix_error(nix_env, 'lib.unitFiles { mode = "user"; command = [ "/x" ]; '
                      "tokenFile = /etc/cmuxd/relay-token; }")
    assert "a path literal would be copied into the world-readable Nix store" in error
    error = nix_error(nix_env, 'lib.launchdAgent { command = [ "/x" ]; home = "/Users/a"; '
                      "tokenFile = /etc/cmuxd/relay-token; }")
    assert "a path literal would be copied into the world-readable Nix store" in error


def test_nix_provides_every_executable_the_units_name(nix_env):
    """NixOS has no /bin: each absolute executable of an Exec*= line other than the daemon
    must be one the modules map to coreutils."""
    provided = set(nix_eval(nix_env, "lib.coreutilsExecutables"))
    named = set()
    for variant in units.nix_units()["systemd"].values():
        for unit in variant:
            for section in unit["sections"].values():
                for key, values in section.items():
                    if key.startswith("Exec"):
                        named |= {re.sub(r"^[-@+!:]+(?=/)", "", v.split()[0])
                                  for v in values}
    assert named - {"@command@"} <= provided, "add them to coreutilsExecutables in nix/lib.nix"


def test_package_dependencies_and_version_come_from_pyproject(nix_env):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> list[str]:
        return [re.match(r"[A-Za-z0-9_.-]+", r).group().replace("_", "-") for r in requirements]

    assert nix_eval(nix_env, "lib.pythonDependencies") == names(project["dependencies"])
    assert "prometheus-client" in nix_eval(nix_env, "lib.pythonDependencies")
    assert nix_eval(nix_env, "lib.pythonLinuxDependencies") == ["systemd-python"]
    assert nix_eval(nix_env, "lib.version") == cmuxd.__version__
    assert nix_eval(nix_env, "lib.pname") == "cmuxd"


def test_unit_sections_refuses_text_it_cannot_carry():
    assert units.unit_sections("# c\n[Unit]\nDescription = a=b\n\n[Service]\nX=1\nX=2\n") == {
        "Unit": {"Description": ["a=b"]}, "Service": {"X": ["1", "2"]}}
    for text in ("Key=value\n", "[Service]\nExecStart=/bin/true \\\n", "[Unit]\nnot a line\n"):
        with pytest.raises(units.UnitsError, match="is not a KEY=VALUE setting"):
            units.unit_sections(text)


def test_session_owners_are_units_the_renderer_writes_and_can_reload(nix_env):
    """The modules reload these on a new package instead of restarting them: a name that no
    longer matches a unit would let an upgrade end every session."""
    owners = nix_eval(nix_env, "lib.sessionOwners")
    assert owners
    for mode, variant in units.nix_units()["systemd"].items():
        by_name = {unit["name"]: unit["sections"] for unit in variant}
        for owner in owners:
            assert owner in by_name, f"{owner} is not a {mode} unit"
            assert by_name[owner]["Service"]["ExecReload"], owner
