# The part of the flake that needs no nixpkgs (builtins only), so that it can be evaluated and
# tested anywhere: it turns nix/units.json, which `python -m cmuxd.units` renders from the same
# units `cmuxd-remote units install` writes, into unit sections, unit-file text and launchd
# plists with the settings of one host. The modules map these onto NixOS, nix-darwin and
# home-manager options; none of them renders a unit of its own.
{ unitsJson ? ./units.json, pyproject ? ../pyproject.toml, versionFile ? ../cmuxd/__init__.py }:
let
  inherit (builtins) attrNames concatMap concatStringsSep filter foldl' isAttrs isInt isList
    isString listToAttrs map mapAttrs match replaceStrings stringLength toString;

  data = builtins.fromJSON (builtins.readFile unitsJson);

  hasInfix = infix: s: match ".*${escapeRegex infix}.*" s != null;
  escapeRegex = replaceStrings [ "@" "." ] [ "[@]" "[.]" ];

  # A bad value as the error shows it: toJSON of a path would copy that file into the store.
  describe = value:
    if isString value || isInt value || value == null then builtins.toJSON value
    else "a ${builtins.typeOf value}";

  # A value must stay one line of a unit file or one plist string.
  checked = what: value:
    if !isString value then throw "cmuxd: ${what} must be a string, not ${builtins.typeOf value}"
    else if match "[^\n\r]*" value == null then
      throw "cmuxd: ${what} holds a line break; give it on one line"
    else value;

  # A path as a string: a path literal would be copied into the world-readable store.
  checkedFile = what: file:
    if isString file && match "/[^\n\r]*" file != null then file
    else throw ("cmuxd: ${what} must be an absolute path on one line, given as a string "
      + "(\"/run/secrets/cmuxd\": a path literal would be copied into the world-readable "
      + "Nix store), not ${describe file}");

  checkedPort = port:
    if isInt port && port >= 1 && port <= 65535 then toString port
    else throw "cmuxd: port must be a number from 1 to 65535, not ${describe port}";

  checkedUser = user:
    if isString user && match "[a-z_][a-z0-9_-]*[$]?" user != null && stringLength user <= 32
    then user
    else throw ("cmuxd: user must be the name of an account (such as \"alice\"), "
      + "not ${describe user}");

  checkedAddress = address:
    if isString address && match "[0-9A-Fa-f.:]+" address != null then address
    else throw ("cmuxd: tailnet address ${describe address} is not an IP address; give "
      + "the host's `tailscale ip` addresses");

  # A literal in a unit file: % would start a specifier.
  unitEscape = replaceStrings [ "%" ] [ "%%" ];

  # One ExecStart= word, as cmuxd.units.exec_quote writes it.
  execQuote = arg:
    let escaped = unitEscape (checked "an argument" arg);
    in if escaped != "" && match "[^ \t\"'\\;$]*" escaped != null then escaped
    else "\"" + replaceStrings [ "\\" "\"" "$" ] [ "\\\\" "\\\"" "$$" ] escaped + "\"";

  bracket = address: if hasInfix ":" address then "[${address}]" else address;

  # Executables the units name by their conventional path; the modules map each to its
  # coreutils store path (NixOS has no /bin/kill).
  coreutilsExecutables = [ "/bin/kill" ];

  # The units whose restart would end every user's session: cmuxd-hub.service runs the PTY hub,
  # which owns the shells, outside the daemon's sandbox. The modules never restart them on a
  # new package; they reload them (the hub re-executes itself in place, keeping the sessions)
  # when they have ExecReload=, else leave them running. cmuxd.service is restarted: the new
  # daemon finds the running hub and adopts its sessions.
  sessionOwners = [ "cmuxd-hub.service" ];

  mapValues = f: sections: mapAttrs (_: mapAttrs (_: concatMap f)) sections;

  # The units of one host. `mode` is "system", "user" or "user-at-boot"; `executables` maps
  # the paths of coreutilsExecutables to store paths.
  systemdUnits =
    { mode ? "system", command, tokenFile, user ? null, port ? 5555, tailnetAddresses ? [ ]
    , serveArgs ? [ ], executables ? { } }:
    let
      substitute = replaceStrings
        ([ "@command@" "@tokenFile@" "@port@" " @serveArgs@" ]
          ++ (if mode == "system" then [ "@user@" ] else [ ])
          ++ attrNames executables)
        ([ (concatStringsSep " " (map execQuote command))
           (unitEscape (checkedFile "tokenFile" tokenFile))
           (checkedPort port)
           (concatStringsSep "" (map (arg: " " + execQuote arg) serveArgs)) ]
          ++ (if mode == "system" then [ (checkedUser user) ] else [ ])
          ++ map (path: checked "executable ${path}" (toString executables.${path}))
            (attrNames executables));
      addresses = map checkedAddress tailnetAddresses;
      # A value naming the tailnet address stands for one value per address.
      expand = value:
        if hasInfix "@tailnetAddress@" value
        then map (a: substitute (replaceStrings [ "@tailnetAddress@" ] [ (bracket a) ] value))
          addresses
        else [ (substitute value) ];
      wanted = filter (unit: addresses != [ ] || !unit.tailnet_only) data.systemd.${mode};
    in
    map (unit: { inherit (unit) name; sections = mapValues expand unit.sections; }) wanted;

  # Drop-ins (NAME.d/FILE.conf) folded into their unit: {NAME = sections}. A value list of the
  # drop-in follows the unit's, as systemd reads a drop-in after its unit.
  mergeDropins = units:
    let
      owner = name:
        let m = match "(.*)[.]d/.*[.]conf" name; in if m == null then name else builtins.head m;
      merge = a: b: a // mapAttrs (section: keys: (a.${section} or { })
        // mapAttrs (key: values: (a.${section}.${key} or [ ]) ++ values) keys) b;
      add = acc: unit:
        acc // { ${owner unit.name} = merge (acc.${owner unit.name} or { }) unit.sections; };
    in
    foldl' add { } units;

  # Unit-file text of sections: what the modules would write; the tests compare it with
  # `cmuxd-remote units install --print` (keys within a section in sorted order).
  unitText = sections: concatStringsSep "\n" (map (section:
    "[${section}]\n" + concatStringsSep "" (concatMap (key:
      map (value: "${key}=${value}\n") sections.${section}.${key})
      (attrNames sections.${section})))
    (attrNames sections));

  # {file name relative to the unit directory: text}, as `units install --print` lists them.
  unitFiles = args: listToAttrs (map
    (unit: { inherit (unit) name; value = unitText unit.sections; })
    (systemdUnits args));

  # The launchd agent's plist as an attribute set (nix-darwin's and home-manager's
  # serviceConfig), with serveArgs after the daemon's own arguments.
  launchdAgent = { command, tokenFile, home, port ? 5555, tailnet ? false, serveArgs ? [ ] }:
    let
      substitute = replaceStrings [ "@tokenFile@" "@port@" "@home@" ]
        [ (checkedFile "tokenFile" tokenFile) (checkedPort port) (checkedFile "home" home) ];
      # "@command@" in a list (ProgramArguments) stands for the command's words.
      walk = value:
        if isString value then substitute value
        else if isList value then concatMap (v:
          if v == "@command@" then map (checked "command") command else [ (walk v) ]) value
        else if isAttrs value then mapAttrs (_: walk) value
        else value;
      plist = walk data.launchd.${if tailnet then "tailnet" else "loopback"};
    in
    plist // {
      ProgramArguments = plist.ProgramArguments ++ map (checked "an argument") serveArgs;
    };

  # nixpkgs' Python package attribute of each requirement of pyproject.toml: the name with
  # _ and . as -.
  project = (builtins.fromTOML (builtins.readFile pyproject)).project;
  attrOf = requirement: replaceStrings [ "_" "." ] [ "-" "-" ]
    (builtins.head (match "([A-Za-z0-9_.-]+).*" requirement));
in
{
  inherit systemdUnits mergeDropins unitText unitFiles launchdAgent execQuote
    coreutilsExecutables sessionOwners;
  pname = project.name;
  version = builtins.head
    (match ".*__version__ = \"([^\"]+)\".*" (builtins.readFile versionFile));
  pythonDependencies = map attrOf project.dependencies;
  # The systemd extra (journal fields, sd_notify through libsystemd): Linux only.
  pythonLinuxDependencies = map attrOf project.optional-dependencies.systemd;
}
