#!/usr/bin/env bash
# Builds the tiny real Linux guest of the integration tests, idempotently, into a cache folder, from
# Debian packages only (apt-get download + dpkg-deb -x; nothing is installed on the host but cpio
# when it is missing), and prints the absolute cache folder path: the one line on stdout.
#
#   bash scripts/guest-image.sh [--force]
#
# Cache folder: $SNAPSHOT_DRIVER_GUEST_DIR, else ${XDG_CACHE_HOME:-$HOME/.cache}/snapshot-driver/guest.
# It holds manifest.json, naming the current build's files in builds/<hash>/: vmlinuz, initrd.img
# (gzip'd cpio newc), root.qcow2 (256 MiB ext4, label guestroot), cmdline (one line). A rerun whose
# inputs (this script and every file under guest/) are unchanged, and whose outputs all exist, only
# prints the path (--force rebuilds). A rebuild never touches an earlier build's files (guests may
# still use them); the last 3 builds are kept.
#
# Boot: qemu-system-x86_64 -kernel vmlinuz -initrd initrd.img -append "$(cat cmdline)" with the
# root disk as virtio-blk (/dev/vda), the serial console on ttyS0 and the guest agent on the
# virtio-serial port org.qemu.guest_agent.0. See guest/ for what runs in the guest.
set -euo pipefail
umask 022
export LC_ALL=C

log() { printf 'guest-image: %s\n' "$*" >&2; }
die() {
  printf 'guest-image: error: %s\n' "$*" >&2
  exit 1
}

force=false
for arg in "$@"; do
  case "$arg" in
    --force) force=true ;;
    -h | --help)
      sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
      exit 0
      ;;
    *) die "unknown argument: $arg (usage: guest-image.sh [--force])" ;;
  esac
done

script=$(readlink -f "${BASH_SOURCE[0]}")
repo=${script%/*}
repo=${repo%/*}
guest_src="$repo/guest"
[ -d "$guest_src" ] || die "guest sources not found: $guest_src"

if [ -n "${SNAPSHOT_DRIVER_GUEST_DIR:-}" ]; then
  cache=$SNAPSHOT_DRIVER_GUEST_DIR
else
  [ -n "${XDG_CACHE_HOME:-}" ] || [ -n "${HOME:-}" ] || die "neither SNAPSHOT_DRIVER_GUEST_DIR, XDG_CACHE_HOME nor HOME is set"
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/snapshot-driver/guest
fi
mkdir -p "$cache" || die "cannot create the cache folder $cache"
cache=$(readlink -f "$cache")

# Each build goes into its own folder, builds/<source hash>/, which manifest.json names: a rebuild
# never replaces the kernel, initrd or base image under guests that still use them (an overlay on
# root.qcow2 opens it again at every start and resume). The last KEEP_BUILDS builds are kept.
OUTPUTS=(manifest.json)
KEEP_BUILDS=3
STAMP="$cache/.source-hash"

# The hash of what decides a rebuild: this script and every file under guest/ (names, contents,
# executable bits). Few processes: it is most of the cost of a cached run.
source_hash() {
  local h
  h=$(
    cd "$repo" || exit 1
    sha256sum scripts/guest-image.sh
    find guest -type f -print0 | sort -z | xargs -0 -r sha256sum
    echo executables
    find guest -type f -perm -u+x | sort
  ) || die "cannot hash the guest sources"
  h=$(sha256sum <<<"$h")
  printf '%s' "${h%% *}"
}

outputs_present() {
  local f
  for f in "${OUTPUTS[@]}"; do [ -s "$cache/$f" ] || return 1; done
  for f in vmlinuz initrd.img root.qcow2 cmdline; do [ -s "$cache/builds/$1/$f" ] || return 1; done
}

command -v flock >/dev/null || die "flock is missing (util-linux)"
exec 9>>"$cache/.lock"
if ! flock -n 9; then
  log "another build holds $cache/.lock: waiting"
  flock 9
fi

src_hash=$(source_hash)
stamp=
if [ -f "$STAMP" ]; then read -r stamp <"$STAMP" || true; fi
build_id=${src_hash:0:16}
if [ "$force" = false ] && [ "$stamp" = "$src_hash" ] && outputs_present "$build_id"; then
  printf '%s\n' "$cache"
  exit 0
fi

start_ms=$(date +%s%3N)
log "building the guest into $cache"

# Leftovers of an interrupted build (we hold the lock: no build is running).
rm -rf "$cache"/.build.*
tmp=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# --- tools -------------------------------------------------------------------------------------
is_root() { [ "$(id -u)" -eq 0 ]; }
apt_updated=false
apt_update() {
  [ "$apt_updated" = false ] || return 0
  is_root || return 1
  log "apt-get update"
  apt-get update -q >&2 || return 1
  apt_updated=true
}

for tool in apt-get apt-cache dpkg-deb gcc qemu-img mkfs.ext4 e2fsck gzip ldd sha256sum find sort readlink truncate; do
  command -v "$tool" >/dev/null || die "required tool is missing: $tool"
done
if ! command -v cpio >/dev/null; then
  is_root || die "cpio is missing and we are not root: install it (apt-get install cpio)"
  log "installing cpio"
  if ! apt-cache show cpio >/dev/null 2>&1; then apt_update || die "apt-get update failed"; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends cpio >&2 ||
    die "cannot install the package cpio"
  command -v cpio >/dev/null || die "cpio is still missing after installing it"
fi

# --- packages ----------------------------------------------------------------------------------
# "<package> <candidate version>" lines, one apt-cache call for all (each call costs about a second).
# (The awk scripts read all their input: an early exit would make pipefail report the writer's SIGPIPE.)
candidates() {
  apt-cache policy "$@" 2>/dev/null |
    awk '/^[^ ]/ { pkg = $1; sub(/:$/, "", pkg) } $1 == "Candidate:" && $2 != "(none)" { print pkg, $2 }'
}

kernel_meta=linux-image-cloud-amd64
resolve_kernel() {
  apt-cache depends "$kernel_meta" 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ && p == "" { p = $2 } END { print p }'
}
kernel_pkg=$(resolve_kernel || true)
if [ -z "$kernel_pkg" ] && apt_update; then kernel_pkg=$(resolve_kernel || true); fi
[ -n "$kernel_pkg" ] || die "cannot resolve the kernel package that $kernel_meta depends on (apt-cache depends $kernel_meta)"

PACKAGES=("$kernel_pkg" busybox-static qemu-guest-agent)
declare -A VERSION
resolve_versions() {
  local pkg ver
  VERSION=()
  while read -r pkg ver; do VERSION[$pkg]=$ver; done < <(candidates "${PACKAGES[@]}")
  for pkg in "${PACKAGES[@]}"; do [ -n "${VERSION[$pkg]:-}" ] || return 1; done
}
if ! resolve_versions && apt_update; then resolve_versions || true; fi
for pkg in "${PACKAGES[@]}"; do
  [ -n "${VERSION[$pkg]:-}" ] || die "package not found in the apt lists: $pkg"
done

debs="$cache/debs"
mkdir -p "$debs"
apt_opts=(-q)
if is_root; then apt_opts+=(-o APT::Sandbox::User=root); fi
declare -A DEB
download() { # pkg version
  rm -rf "$tmp/dl"
  mkdir -p "$tmp/dl"
  (cd "$tmp/dl" && apt-get download "${apt_opts[@]}" "$1=$2" >&2)
}
for pkg in "${PACKAGES[@]}"; do
  ver=${VERSION[$pkg]}
  ver_file=${ver//:/%3a}
  deb=$(find "$debs" -maxdepth 1 -name "${pkg}_${ver_file}_*.deb" -print -quit)
  if [ -z "$deb" ]; then
    log "downloading $pkg $ver"
    if ! download "$pkg" "$ver"; then
      # Stale package lists (that version is gone from the mirror): update them once and retry.
      { [ "$apt_updated" = false ] && apt_update; } || die "cannot download the package $pkg ($ver)"
      ver=$(candidates "$pkg" | awk '{ v = $2 } END { print v }')
      [ -n "$ver" ] || die "package not found in the apt lists: $pkg"
      VERSION[$pkg]=$ver
      download "$pkg" "$ver" || die "cannot download the package $pkg ($ver)"
    fi
    dl=$(find "$tmp/dl" -maxdepth 1 -name "${pkg}_*.deb" -print -quit)
    [ -n "$dl" ] || die "apt-get download left no .deb for the package $pkg"
    # Older versions of this package are of no more use.
    find "$debs" -maxdepth 1 -name "${pkg}_*.deb" -delete
    mv -f "$dl" "$debs/"
    deb="$debs/${dl##*/}"
  fi
  DEB[$pkg]=$deb
done

{
  for pkg in "${PACKAGES[@]}"; do printf '%s %s\n' "$pkg" "${VERSION[$pkg]}"; done
} >"$tmp/packages.txt"
inputs_hash=$( (printf '%s\n' "$src_hash" && cat "$tmp/packages.txt") | sha256sum | cut -d' ' -f1)

# --- unpack ------------------------------------------------------------------------------------
for pkg in "${PACKAGES[@]}"; do
  mkdir -p "$tmp/pkg/$pkg"
  dpkg-deb -x "${DEB[$pkg]}" "$tmp/pkg/$pkg" || die "cannot unpack the package $pkg (${DEB[$pkg]})"
done

kroot="$tmp/pkg/$kernel_pkg"
kver=$(find "$kroot/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' -quit)
[ -n "$kver" ] || die "no lib/modules/<version> in the package $kernel_pkg"
[ -f "$kroot/boot/vmlinuz-$kver" ] || die "no boot/vmlinuz-$kver in the package $kernel_pkg"
kconfig="$kroot/boot/config-$kver"
[ -f "$kconfig" ] || die "no boot/config-$kver in the package $kernel_pkg"
moddir="$kroot/lib/modules/$kver"

busybox="$tmp/pkg/busybox-static/bin/busybox"
[ -x "$busybox" ] || die "no bin/busybox in the package busybox-static"
qemu_ga="$tmp/pkg/qemu-guest-agent/usr/sbin/qemu-ga"
[ -x "$qemu_ga" ] || die "no usr/sbin/qemu-ga in the package qemu-guest-agent"

# --- kernel modules ----------------------------------------------------------------------------
kconf() { sed -n "s/^CONFIG_$1=//p" "$kconfig"; }
for opt in EXT4_FS JBD2 VIRTIO_PCI VIRTIO_BLK VIRTIO_CONSOLE RTC_DRV_CMOS INPUT_EVDEV ACPI_BUTTON DEVTMPFS RD_GZIP; do
  log "kernel config $opt=$(kconf "$opt")"
done
[ "$(kconf RD_GZIP)" = y ] || die "the kernel $kver cannot unpack a gzip initramfs (CONFIG_RD_GZIP)"
case "$(kconf EXT4_FS)" in y) ;; *) die "ext4 is not built into the kernel $kver" ;; esac

declare -A MODFILE BUILTIN
while IFS= read -r -d '' f; do
  base=${f##*/}
  base=${base%%.ko*}
  MODFILE[${base//-/_}]=$f
done < <(find "$moddir/kernel" \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) -print0)
if [ -f "$moddir/modules.builtin" ]; then
  while IFS= read -r line; do
    base=${line##*/}
    base=${base%%.ko*}
    BUILTIN[${base//-/_}]=1
  done <"$moddir/modules.builtin"
fi

irfs="$tmp/initramfs"
mkdir -p "$irfs/bin" "$irfs/dev" "$irfs/proc" "$irfs/sys" "$irfs/newroot" "$irfs/lib/modules"

# Uncompressed copy of a module in the initramfs.
module_copy() {
  local src=$1 dst=$2
  case "$src" in
    *.ko) cp "$src" "$dst" ;;
    *.ko.xz) xz -dc "$src" >"$dst" ;;
    *.ko.zst) zstd -qdc "$src" >"$dst" ;;
    *.ko.gz) gzip -dc "$src" >"$dst" ;;
  esac || die "cannot decompress the kernel module $src"
}
# The depends= field of a module's .modinfo (comma-separated names).
module_depends() {
  tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | tr -d '\n'
}

declare -A MOD_SEEN
MOD_ORDER=()
add_module() { # name required(1|0)
  local name=${1//-/_} required=$2 dep deps
  [ -z "${MOD_SEEN[$name]:-}" ] || return 0
  MOD_SEEN[$name]=1
  if [ -n "${BUILTIN[$name]:-}" ]; then
    log "module $name: built in"
    return 0
  fi
  if [ -z "${MODFILE[$name]:-}" ]; then
    [ "$required" = 1 ] || { log "module $name: not in $kernel_pkg (skipped)"; return 1; }
    die "kernel module $name is neither built in nor in the package $kernel_pkg"
  fi
  module_copy "${MODFILE[$name]}" "$irfs/lib/modules/$name.ko"
  deps=$(module_depends "$irfs/lib/modules/$name.ko")
  local IFS=,
  for dep in $deps; do
    [ -n "$dep" ] || continue
    add_module "$dep" 1
  done
  MOD_ORDER+=("$name")
}
for m in virtio_pci virtio_blk virtio_console rtc_cmos; do add_module "$m" 1; done
# The ACPI power button (QMP system_powerdown -> busybox acpid -> poweroff) needs both.
acpi_button=true
for m in evdev button; do add_module "$m" 0 || acpi_button=false; done
[ "$acpi_button" = true ] || log "no ACPI power button support: system_powerdown will not power the guest off"
printf '%s\n' "${MOD_ORDER[@]}" >"$irfs/lib/modules/modules.load"
log "initramfs modules (load order): ${MOD_ORDER[*]}"

# --- initramfs ---------------------------------------------------------------------------------
# make_links TARGET DIR: a symlink DIR/<name> -> TARGET for every name on stdin (existing files
# are kept). One process for the few hundred busybox applets (perl-base is Essential in Debian).
make_links() {
  if command -v perl >/dev/null; then
    LINK_TARGET=$1 LINK_DIR=$2 perl -ne 'chomp; next if $_ eq ""; my $l = "$ENV{LINK_DIR}/$_";
      next if -e $l || -l $l; symlink($ENV{LINK_TARGET}, $l) or die "symlink $l: $!\n";'
  else
    local name
    while IFS= read -r name; do
      [ -n "$name" ] && ! [ -e "$2/$name" ] && ! [ -L "$2/$name" ] || continue
      ln -s "$1" "$2/$name"
    done
  fi
}
cp "$busybox" "$irfs/bin/busybox"
"$busybox" --list | grep -vx -e busybox -e linuxrc | make_links busybox "$irfs/bin" ||
  die "cannot make the busybox links of the initramfs"
install -m 0755 "$guest_src/initramfs/init" "$irfs/init"

mkdir -p "$tmp/out"
(cd "$irfs" && find . -print0 | sort -z | cpio --null --create --format=newc --owner=0:0 --quiet) |
  gzip -9 -n >"$tmp/out/initrd.img" || die "cannot make the initramfs"
cp "$kroot/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"

# --- guest programs ----------------------------------------------------------------------------
mkdir -p "$tmp/bin"
for prog in writer probe; do
  gcc -static -O2 -Wall -Werror -pthread -s -o "$tmp/bin/$prog" "$guest_src/$prog.c" -lm >&2 ||
    die "cannot compile guest/$prog.c"
done

# --- root filesystem ---------------------------------------------------------------------------
rootfs="$tmp/rootfs"
mkdir -p "$rootfs"
(cd "$rootfs" && mkdir -p bin sbin usr/bin usr/sbin lib lib64 dev proc sys run tmp root etc var/lib/writer var/log)
chmod 1777 "$rootfs/tmp"
chmod 0700 "$rootfs/root"
ln -s /run "$rootfs/var/run"
ln -s ../proc/self/mounts "$rootfs/etc/mtab"
# This script's overlay first (inittab, init scripts, /sbin/shutdown, acpid config ...), then busybox
# and its applet links (made here, not at boot: the root filesystem is frozen during snapshots).
cp -R --preserve=mode "$guest_src/rootfs/." "$rootfs/"
find "$rootfs/etc/init.d" "$rootfs/etc/acpi" "$rootfs/usr/libexec/guest" "$rootfs/sbin" -type f -exec chmod 0755 {} +
cp "$busybox" "$rootfs/bin/busybox"
"$busybox" --list-full | grep -vx -e bin/busybox -e linuxrc | make_links /bin/busybox "$rootfs" ||
  die "cannot make the busybox links of the root filesystem"
install -m 0755 "$tmp/bin/writer" "$rootfs/usr/bin/writer"
install -m 0755 "$tmp/bin/probe" "$rootfs/usr/bin/probe"
if [ "$acpi_button" = false ]; then rm -f "$rootfs/etc/acpid.conf"; fi

# qemu-ga and the shared libraries it needs, at the same paths as on this host.
install -m 0755 "$qemu_ga" "$rootfs/usr/sbin/qemu-ga"
ldd_out=$(ldd "$qemu_ga" 2>&1) || die "ldd cannot read qemu-ga: $ldd_out"
missing=$(printf '%s\n' "$ldd_out" | awk '/not found/ { print $1 }' | sort -u | tr '\n' ' ')
[ -z "$missing" ] || die "qemu-ga needs shared libraries this host lacks: ${missing% } (ldd: $(printf '%s\n' "$ldd_out" | grep 'not found' | tr '\n' ';'))"
while IFS= read -r lib; do
  [ -n "$lib" ] || continue
  [ -f "$lib" ] || die "qemu-ga needs $lib, which does not exist"
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done < <(printf '%s\n' "$ldd_out" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)

root_mib=256
truncate -s "${root_mib}M" "$tmp/root.raw"
mkfs.ext4 -q -F -T default -L guestroot -d "$rootfs" "$tmp/root.raw" >&2 || die "mkfs.ext4 failed"
e2fsck -fn "$tmp/root.raw" >/dev/null 2>&1 || die "the new root filesystem does not pass e2fsck -fn"
qemu-img convert -f raw -O qcow2 "$tmp/root.raw" "$tmp/out/root.qcow2" || die "qemu-img convert failed"
rm -f "$tmp/root.raw"

# --- cmdline and manifest ----------------------------------------------------------------------
cmdline="console=ttyS0 quiet hpet=disable panic=-1 root=/dev/vda rootfstype=ext4"
printf '%s\n' "$cmdline" >"$tmp/out/cmdline"

json_str() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\t'/\\t}
  s=${s//$'\n'/\\n}
  printf '"%s"' "$s"
}
build_dir=$cache/builds/$build_id
{
  printf '{\n'
  printf '  "kernel": %s,\n' "$(json_str "$build_dir/vmlinuz")"
  printf '  "initrd": %s,\n' "$(json_str "$build_dir/initrd.img")"
  printf '  "root_disk": %s,\n' "$(json_str "$build_dir/root.qcow2")"
  printf '  "root_disk_format": "qcow2",\n'
  printf '  "cmdline": %s,\n' "$(json_str "$cmdline")"
  printf '  "kernel_version": %s,\n' "$(json_str "$kver")"
  printf '  "built_at": "%s",\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  printf '  "inputs_hash": "%s"\n' "$inputs_hash"
  printf '}\n'
} >"$tmp/out/manifest.json"
cp "$tmp/packages.txt" "$tmp/out/packages.txt"

# --- into place --------------------------------------------------------------------------------
sync "$tmp/out"/* 2>/dev/null || sync
rm -f "$STAMP"
mkdir -p "$cache/builds"
rm -rf "$build_dir"
mkdir "$build_dir"
for f in vmlinuz initrd.img root.qcow2 cmdline packages.txt; do
  mv -f "$tmp/out/$f" "$build_dir/$f"
done
mv -f "$tmp/out/manifest.json" "$cache/manifest.json"
# Files of the layout before builds/ (unversioned), and builds beyond the last KEEP_BUILDS.
rm -f "$cache"/vmlinuz "$cache"/initrd.img "$cache"/root.qcow2 "$cache"/cmdline "$cache"/packages.txt
ls -1dt "$cache"/builds/*/ 2>/dev/null | tail -n +$((KEEP_BUILDS + 1)) | xargs -r rm -rf
printf '%s\n' "$src_hash" >"$tmp/stamp"
sync "$tmp/stamp" 2>/dev/null || true
mv -f "$tmp/stamp" "$STAMP"

log "kernel $kver; initramfs $(du -k "$build_dir/initrd.img" | cut -f1) KiB; root fs data $(du -sk "$rootfs" | cut -f1) KiB; root.qcow2 $(du -k "$build_dir/root.qcow2" | cut -f1) KiB"
log "packages: $(tr '\n' ';' <"$build_dir/packages.txt")"
elapsed_ms=$(($(date +%s%3N) - start_ms))
log "built in $((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000))) s"
printf '%s\n' "$cache"
