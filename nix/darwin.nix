# services.cmuxd for nix-darwin: the LaunchAgent `cmuxd-remote units install --launchd` writes,
# from nix/units.json. launchd.user.agents load in every GUI login; the socket, the log and the
# token are those of `user`, so the agent serves that user.
{ self }:
{ config, lib, pkgs, ... }:
let
  cfg = config.services.cmuxd;
  units = import ./lib.nix { };
  settings = import ./options.nix { inherit lib pkgs self; };
  inherit (cfg) home;
in
{
  options.services.cmuxd = settings.common // {
    user = lib.mkOption {
      type = lib.types.str;
      example = "alice";
      description = "The account served: its home holds the socket, the log and the token.";
    };
    home = lib.mkOption {
      type = lib.types.str;
      default = "/Users/${cfg.user}";
      defaultText = lib.literalExpression "\"/Users/\${config.services.cmuxd.user}\"";
      description = "The home directory of `user`.";
    };
    tokenFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = ''
        The relay token (default: ~/.config/cmuxd/relay-token of `user`). A string, not a
        path, so that it is not copied into the Nix store.
      '';
    };
    tailnet = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Listen on every address and serve only tailnet and loopback peers (launchd binds
        before tailscaled has an address, so it cannot bind the tailnet address itself).
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    environment.systemPackages = [ cfg.package ];
    launchd.user.agents.cmuxd.serviceConfig = units.launchdAgent {
      command = [ "${cfg.package}/bin/cmuxd-remote" ];
      tokenFile = if cfg.tokenFile != null then cfg.tokenFile
        else "${home}/.config/cmuxd/relay-token";
      inherit home;
      inherit (cfg) port tailnet;
      serveArgs = settings.serveArgs cfg;
    };
  };
}
