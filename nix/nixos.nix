# services.cmuxd for NixOS: the cmuxd.socket and cmuxd.service (and any other unit) that
# `cmuxd-remote units install --systemd --system` writes, from nix/units.json.
{ self }:
{ config, lib, pkgs, ... }:
let
  cfg = config.services.cmuxd;
  units = import ./lib.nix { };
  settings = import ./options.nix { inherit lib pkgs self; };
  merged = units.mergeDropins (units.systemdUnits {
    mode = "system";
    command = [ "${cfg.package}/bin/cmuxd-remote" ];
    inherit (cfg) tokenFile user port tailnetAddresses;
    serveArgs = settings.serveArgs cfg;
    executables = lib.genAttrs units.coreutilsExecutables
      (path: "${pkgs.coreutils}/bin/${baseNameOf path}");
  });
  kinds = { service = "Service"; socket = "Socket"; timer = "Timer"; path = "Path"; };
  toNixos = name: sections:
    let
      parts = builtins.match "(.*)[.]([a-z]+)" name;
      base = builtins.elemAt parts 0;
      kind = builtins.elemAt parts 1;
      install = sections.Install or { };
    in
    {
      "${kind}s".${base} = {
        unitConfig = sections.Unit or { };
        "${kind}Config" = sections.${kinds.${kind}} or { };
        wantedBy = install.WantedBy or [ ];
        requiredBy = install.RequiredBy or [ ];
      } // lib.optionalAttrs (kind == "service") {
        # A new package restarts cmuxd.service (the restarted daemon adopts the running
        # sessions) but only reloads a session owner: its restart would end every session.
        restartIfChanged = !(builtins.elem name units.sessionOwners);
        reloadIfChanged = builtins.elem name units.sessionOwners && sections.Service ? ExecReload;
      };
    };
in
{
  options.services.cmuxd = settings.common // {
    inherit (settings) tailnetAddresses;
    user = lib.mkOption {
      type = lib.types.str;
      example = "alice";
      description = "The account whose shells the daemon serves (User=).";
    };
    tokenFile = lib.mkOption {
      type = lib.types.str;
      default = "/etc/cmuxd/relay-token";
      description = ''
        The relay token, handed to the service as the credential `relay-token`
        (LoadCredential=). A string, not a path: a path would be copied into the
        world-readable Nix store. Create it with `cmuxd-remote token new PATH`
        or a secrets manager; it must be readable by root only.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    environment.systemPackages = [ cfg.package ];
    systemd = lib.mkMerge (lib.mapAttrsToList toNixos merged);
  };
}
