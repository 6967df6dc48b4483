{
  description = "cmuxd: the cmux remote daemon over stdio, TCP and Unix sockets";

  # No flake.lock is checked in: pin nixpkgs in the flake that uses this one (README, Nix).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
      forEach = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forEach (pkgs: { default = pkgs.callPackage ./nix/package.nix { }; });
      nixosModules.default = import ./nix/nixos.nix { inherit self; };
      darwinModules.default = import ./nix/darwin.nix { inherit self; };
      homeManagerModules.default = import ./nix/home-manager.nix { inherit self; };
      # The builtins-only part: unit sections, unit files and plists for any settings.
      lib = import ./nix/lib.nix { };
    };
}
