#!/bin/bash
# Boot systemd as PID 1 of the PID and mount namespace this script was started in, on a
# throw-away root: run as `unshare -p -f -m --propagation private --kill-child` SCRIPT
#   BASE UNITS_DIR TARGET [EXTRA_PATH...]
#
# Every write systemd makes must land in a tmpfs: booted on the real root, systemd-tmpfiles
# empties the host's /tmp. So the root is an overlay (lower: the host's /, upper: a tmpfs on
# BASE), with fresh tmpfs on /run and /tmp, and the script refuses to exec systemd unless each
# of those is verifiably a mount point of the expected type. EXTRA_PATHs (a checkout or an
# interpreter that the overlay would not show: on another filesystem, or under /tmp) are bound
# in read-only at the same place, so nothing inside can change them.
#
# The cgroup the boot runs in (relative to the hierarchy root) is written to BASE.cgroup for
# the caller to remove after teardown.
set -euo pipefail

base=$1 units=$2 target=$3
shift 3

die() { echo "boot-systemd: $*" >&2; exit 1; }
fstype() { findmnt -n -o FSTYPE --mountpoint "$1" | tail -n1; }

[ "$$" = 1 ] || die "not PID 1 of a new PID namespace; run me through unshare -p -f -m"
[ -d "$base" ] && [ -z "$(ls -A "$base")" ] || die "$base must be an existing empty directory"

# Our own cgroup, so systemd's init.scope and system.slice (which it creates below the cgroup
# it starts in) cannot collide with another test boot, and teardown knows what to remove.
# (Read the list once: /proc/self/cgroup changes under a loop that reads it line by line.)
cg_name=$(basename "$base")
cgroups=$(cat /proc/self/cgroup)
while IFS=: read -r _ controllers path; do
    case $controllers in
        "") hierarchy=$(findmnt -n -o TARGET -t cgroup2 | head -n1) ;;
        name=systemd) hierarchy=/sys/fs/cgroup/systemd ;;
        *) continue ;;
    esac
    [ -n "$hierarchy" ] && [ -d "$hierarchy$path" ] || continue
    mkdir -p "$hierarchy${path%/}/$cg_name"
    echo 0 > "$hierarchy${path%/}/$cg_name/cgroup.procs"
    echo "${path%/}/$cg_name" > "$base.cgroup"
done <<< "$cgroups"

mount -t tmpfs -o mode=0700 cmuxd-test-root "$base"
[ "$(fstype "$base")" = tmpfs ] || die "$base is not a tmpfs"
mkdir "$base/upper" "$base/work" "$base/root"
root=$base/root
mount -t overlay overlay -o "lowerdir=/,upperdir=$base/upper,workdir=$base/work" "$root"
mount --rbind /dev "$root/dev"
mount --rbind /sys "$root/sys"
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
for extra in "$@"; do
    mkdir -p "$root$extra"
    mount --rbind "$extra" "$root$extra"
    mount -o remount,bind,ro "$root$extra"
done

[ "$(fstype "$root")" = overlay ] || die "$root is not the overlay"
[ "$(fstype "$root/run")" = tmpfs ] || die "$root/run is not a tmpfs"
[ "$(fstype "$root/tmp")" = tmpfs ] || die "$root/tmp is not a tmpfs"
[ "$(fstype "$root/proc")" = proc ] || die "$root/proc is not proc"
mountpoint -q "$root/dev" || die "$root/dev is not a mount point"
mountpoint -q "$root/sys" || die "$root/sys is not a mount point"

# Without shared propagation, LoadCredential= hands the service an empty credentials
# directory (systemd mounts it in the service's namespace and expects it to propagate).
mount --make-rshared "$root"

mkdir -p "$root/run/systemd/system"
cp -r -- "$units"/. "$root/run/systemd/system/"

# Units that would reach the host's kernel settings, devices or network, or run maintenance
# on the shared disk. (Any socket or service unit pulls in sysinit.target, so its members
# start too, not just the target given below.)
for unit in systemd-sysctl.service systemd-modules-load.service systemd-binfmt.service \
        proc-sys-fs-binfmt_misc.automount proc-sys-fs-binfmt_misc.mount \
        apt-daily.timer apt-daily-upgrade.timer fstrim.timer e2scrub_all.timer \
        man-db.timer dpkg-db-backup.timer systemd-tmpfiles-clean.timer \
        systemd-journald-audit.socket systemd-pstore.service systemd-remount-fs.service \
        kmod-static-nodes.service systemd-tmpfiles-setup-dev.service systemd-udevd.service \
        systemd-udev-trigger.service systemd-networkd.service systemd-resolved.service \
        systemd-timesyncd.service; do
    ln -sfn /dev/null "$root/etc/systemd/system/$unit"
done
# The journal of this boot holds what ran in it, not the host's kernel log.
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nReadKMsg=no\n' > "$root/etc/systemd/journald.conf.d/cmuxd-test.conf"

cd "$root"
exec chroot . /usr/bin/env container=other /lib/systemd/systemd --system \
    --unit="$target" --log-target=journal
