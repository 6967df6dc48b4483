# services.cmuxd for home-manager: on Linux the user units of
# `cmuxd-remote units install --systemd --user [--at-boot]`, on macOS the LaunchAgent of
# `units install --launchd`, both from nix/units.json.
{ self }:
{ config, lib, pkgs, ... }:
let
  cfg = config.services.cmuxd;
  units = import ./lib.nix { };
  settings = import ./options.nix { inherit lib pkgs self; };
  command = [ "${cfg.package}/bin/cmuxd-remote" ];
  home = config.home.homeDirectory;
  tokenFile = if cfg.tokenFile != null then cfg.tokenFile
    else "${config.xdg.configHome}/cmuxd/relay-token";
  merged = units.mergeDropins (units.systemdUnits {
    mode = if cfg.atBoot then "user-at-boot" else "user";
    inherit command tokenFile;
    inherit (cfg) port tailnetAddresses;
    serveArgs = settings.serveArgs cfg;
    executables = lib.genAttrs units.coreutilsExecutables
      (path: "${pkgs.coreutils}/bin/${baseNameOf path}");
  });
  # home-manager takes the sections as they are: systemd.user.services.NAME.Service = {…}.
  # sd-switch reloads a session owner, or leaves it running, instead of restarting it.
  toUser = name: sections:
    let
      parts = builtins.match "(.*)[.]([a-z]+)" name;
      switch = if sections.Service ? ExecReload then "reload" else "keep-old";
      owner = lib.optionalAttrs (builtins.elem name units.sessionOwners) {
        Unit = (sections.Unit or { }) // { X-SwitchMethod = [ switch ]; };
      };
    in
    { "${builtins.elemAt parts 1}s".${builtins.elemAt parts 0} = sections // owner; };
in
{
  options.services.cmuxd = settings.common // {
    inherit (settings) tailnetAddresses;
    tokenFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = ''
        The relay token (default: ~/.config/cmuxd/relay-token; `cmuxd-remote token new`
        creates it). A string, not a path, so that it is not copied into the Nix store.
      '';
    };
    atBoot = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Linux: start the daemon with the user manager (at login, or at boot with
        `loginctl enable-linger`), not only on the first connection.
      '';
    };
    tailnet = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "macOS: listen on every address and serve only tailnet and loopback peers.";
    };
  };

  config = lib.mkIf cfg.enable (lib.mkMerge [
    { home.packages = [ cfg.package ]; }
    (lib.mkIf pkgs.stdenv.isLinux {
      systemd.user = lib.mkMerge (lib.mapAttrsToList toUser merged);
    })
    (lib.mkIf pkgs.stdenv.isDarwin {
      launchd.agents.cmuxd = {
        enable = true;
        config = units.launchdAgent {
          inherit command tokenFile home;
          inherit (cfg) port tailnet;
          serveArgs = settings.serveArgs cfg;
        };
      };
    })
  ]);
}
