# cmuxd-remote built from pyproject.toml with nixpkgs' Python packages; the dependency list and
# the version are read from pyproject.toml and cmuxd/__init__.py (nix/lib.nix).
{ lib, stdenv, python3Packages }:
let
  project = import ./lib.nix { };
  # nixpkgs before systemd-python was renamed calls it `systemd`.
  dependency = name: python3Packages.${name} or python3Packages.${lib.removeSuffix "-python" name};
in
python3Packages.buildPythonApplication {
  inherit (project) pname version;
  pyproject = true;
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [ ../pyproject.toml ../README.md ../cmuxd ];
  };
  build-system = [ python3Packages.setuptools ];
  dependencies = map dependency (project.pythonDependencies
    ++ lib.optionals stdenv.hostPlatform.isLinux project.pythonLinuxDependencies);
  # The tests need real sockets, network namespaces and systemd, not a build sandbox.
  doCheck = false;
  pythonImportsCheck = [ "cmuxd" ];
  meta = {
    description = "The cmux remote daemon over stdio, TCP (relay-token auth) and Unix sockets";
    license = lib.licenses.mit;
    mainProgram = "cmuxd-remote";
  };
}
