# The settings every module shares, and how they become `serve` arguments.
{ lib, pkgs, self }:
{
  common = {
    enable = lib.mkEnableOption "the cmux remote daemon (cmuxd-remote)";
    package = lib.mkOption {
      type = lib.types.package;
      default = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      defaultText = lib.literalMD "the cmuxd flake's package for this system";
      description = "The cmuxd package.";
    };
    port = lib.mkOption {
      type = lib.types.port;
      default = 5555;
      description = "The TCP port on loopback and on the tailnet addresses.";
    };
    allowFrom = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "tailnet" "loopback" ];
      description = "Serve TCP peers only from these networks (`--allow-from`).";
    };
    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "--workers" "4" ];
      description = "More arguments of `cmuxd-remote serve`.";
    };
  };

  # systemd only: launchd binds before tailscaled has an address (darwin's `tailnet`).
  tailnetAddresses = lib.mkOption {
    type = lib.types.listOf lib.types.str;
    default = [ ];
    example = [ "100.101.102.103" "fd7a:115c:a1e0::1" ];
    description = ''
      This host's Tailscale addresses (`tailscale ip`) to listen on as well; the socket binds
      them at boot before tailscaled has assigned them (FreeBind=).
    '';
  };

  serveArgs = cfg: lib.concatMap (net: [ "--allow-from" net ]) cfg.allowFrom ++ cfg.extraArgs;
}
