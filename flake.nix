{
  description = "cmuxd: the cmux remote daemon over stdio, TCP and Unix sockets";

  # No flake.lock is checked in: pin nixpkgs in the flake that uses this one (README, Nix).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
      forEach = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      module = file: { pkgs, ... }@args:
        import file { defaultPackage = self.packages.${pkgs.stdenv.hostPlatform.system}.default; } args;
    in
    {
      packages = forEach (pkgs: { default = pkgs.callPackage ./nix/package.nix { }; });
      nixosModules.default = module ./nix/nixos.nix;
      darwinModules.default = module ./nix/darwin.nix;
      homeManagerModules.default = module ./nix/home-manager.nix;
      # The builtins-only part: unit sections, unit files and plists for any settings.
      lib = import ./nix/lib.nix { };
    };
}
