# cmuxd-remote built from pyproject.toml with nixpkgs' Python packages; the dependency list and
# the version are read from pyproject.toml and cmuxd/__init__.py (nix/lib.nix).
{ lib, python3Packages }:
let
  project = import ./lib.nix { };
in
python3Packages.buildPythonApplication {
  inherit (project) pname version;
  pyproject = true;
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [ ../pyproject.toml ../README.md ../cmuxd ];
  };
  build-system = [ python3Packages.setuptools ];
  dependencies = map (name: python3Packages.${name}) project.pythonDependencies;
  # The tests need real sockets, network namespaces and systemd, not a build sandbox.
  doCheck = false;
  pythonImportsCheck = [ "cmuxd" ];
  meta = {
    description = "The cmux remote daemon over stdio, TCP (relay-token auth) and Unix sockets";
    license = lib.licenses.mit;
    mainProgram = "cmuxd-remote";
  };
}
