#!/usr/bin/env bash
# provision-kmod.sh — build native/kmod/kvmmem.ko for the live-target kernel,
# and keep the guest modules the lab needs from that kernel's package.
#
# The kernel is the one scripts/live-target/provision.sh put in the cache dir
# ($KVMMEM_LIVE_DIR, default ~/.cache/kvmmem-live): its release is read from
# the vmlinuz-<release> the kit boots (and checked against kernel-package),
# never hard-coded. Steps, each skipped when its result is already there:
#   1. headers: apt-get download linux-headers-<release>, its -common and
#      linux-kbuild-<major.minor>; dpkg -x into kheaders/<release>/; the
#      flavour Makefile's absolute include is rewritten to the unpacked path.
#   2. modules: the image package (re-downloaded: provision.sh deletes its
#      debs) -> modules/<release>/ keeps the lab's guest modules and their
#      dependencies (fuse virtiofs failover net_failover virtio_net, the
#      virtio_pci bus driver they need on this kernel, virtio_blk,
#      virtio_console) plus load-order (dependencies first).
#   3. kvmmem.ko, cached under kmod/<hash>/ by a hash of its sources, this
#      script, the release, the header package version and the compiler.
#      Its vermagic is checked against the release.
# Prints KMOD=<kvmmem.ko>, KHEADERS=<kernel build dir>, MODULES=<dir>,
# KVER=<release>, one per line. A re-run with nothing changed does no apt
# or compiler work.
#
# --no-download: never run apt (tests use it): when the headers or modules
# are missing, say so and exit 3 (still builds kvmmem.ko when they are there).
# Exit 3 also when the live target itself is not provisioned.
set -euo pipefail

die() { echo "provision-kmod.sh: error: $*" >&2; exit 1; }
log() { echo "provision-kmod.sh: $*" >&2; }
# not provisioned (exit 3: tests skip on it)
unprovisioned() { echo "provision-kmod.sh: not provisioned: $*; run: bash scripts/live-target/provision.sh" >&2; exit 3; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
DIR="${KVMMEM_LIVE_DIR:-${HOME:-/root}/.cache/kvmmem-live}"
[ -d "$DIR" ] || unprovisioned "no live-target cache at $DIR"
DIR="$(cd "$DIR" && pwd)"
NO_DOWNLOAD=0
for a in "$@"; do
  case "$a" in
    --no-download) NO_DOWNLOAD=1 ;;
    *) die "usage: provision-kmod.sh [--no-download]" ;;
  esac
done
WANT_MODULES=(fuse virtiofs failover net_failover virtio_net virtio_pci virtio_blk virtio_console)

# ------------------------------------------------------------ the booted kernel's release
[ -e "$DIR/vmlinuz" ] || unprovisioned "no kernel at $DIR/vmlinuz"
VMLINUZ="$(readlink -f "$DIR/vmlinuz")"
KVER="$(basename "$VMLINUZ")"; KVER="${KVER#vmlinuz-}"
[[ "$KVER" =~ ^(([0-9]+)\.([0-9]+)\.[0-9]+-[0-9]+)-([a-z0-9-]+)$ ]] \
  || die "cannot parse a Debian kernel release from $VMLINUZ (want vmlinuz-<x.y.z-abi-flavour>)"
ABI="${BASH_REMATCH[1]}"; MAJMIN="${BASH_REMATCH[2]}.${BASH_REMATCH[3]}"
IMG_PKG="linux-image-$KVER"
if [ -s "$DIR/kernel-package" ] && [ "$(cat "$DIR/kernel-package")" != "$IMG_PKG" ]; then
  die "$DIR/kernel-package says $(cat "$DIR/kernel-package") but the kit boots $VMLINUZ; re-run scripts/live-target/provision.sh"
fi
HDR_PKG="linux-headers-$KVER"; COMMON_PKG="linux-headers-$ABI-common"; KBUILD_PKG="linux-kbuild-$MAJMIN"

# Not provision.sh's lock: it holds that one while it runs this script.
exec 8>"$DIR/.kmod.lock"
flock -w 600 8 || die "timed out waiting for another provision-kmod.sh run ($DIR/.kmod.lock)"

SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
APT_OPTS=(-q)
[ "$(id -u)" -eq 0 ] && APT_OPTS+=(-o APT::Sandbox::User=root)
LOG="$DIR/kmod-provision.log"
: > "$LOG"
run_logged() {
  echo "+ $*" >> "$LOG"
  if ! "$@" >> "$LOG" 2>&1; then tail -n 20 "$LOG" >&2; return 1; fi
}
APT_UPDATED=0
# apt_download DEST PKG...: into DEST, retrying once after apt-get update (stale lists)
apt_download() {
  local dest="$1"; shift
  [ "$NO_DOWNLOAD" -eq 1 ] && unprovisioned "--no-download, and $* would be needed"
  command -v apt-get >/dev/null 2>&1 || die "apt-get not available to download $*"
  if (cd "$dest" && run_logged apt-get "${APT_OPTS[@]}" download "$@"); then return 0; fi
  if [ "$APT_UPDATED" -eq 0 ]; then
    log "apt-get update"
    run_logged $SUDO apt-get update -q || die "apt-get update failed (see $LOG)"
    APT_UPDATED=1
  fi
  (cd "$dest" && run_logged apt-get "${APT_OPTS[@]}" download "$@") || die "apt-get download $* failed (see $LOG)"
}
# pkg_version PKG: the candidate version apt would download
pkg_version() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2; exit }'; }

# ------------------------------------------------------------ 1. headers
KH_ROOT="$DIR/kheaders/$KVER"
KHEADERS="$KH_ROOT/usr/src/linux-headers-$KVER"
COMMON_DIR="$KH_ROOT/usr/src/linux-headers-$ABI-common"
if [ ! -s "$KH_ROOT/.ok" ] || [ ! -s "$KHEADERS/Module.symvers" ] || [ ! -f "$COMMON_DIR/Makefile" ]; then
  [ "$NO_DOWNLOAD" -eq 1 ] && apt_download "$DIR" "$HDR_PKG"
  PKGVER="$(pkg_version "$HDR_PKG")"
  if [ -z "$PKGVER" ] || [ "$PKGVER" = "(none)" ]; then
    [ "$APT_UPDATED" -eq 0 ] && { log "apt-get update"; run_logged $SUDO apt-get update -q || die "apt-get update failed (see $LOG)"; APT_UPDATED=1; }
    PKGVER="$(pkg_version "$HDR_PKG")"
  fi
  [ -n "$PKGVER" ] && [ "$PKGVER" != "(none)" ] || die "apt knows no $HDR_PKG (the headers of the booted kernel $KVER)"
  log "headers of $KVER: $HDR_PKG=$PKGVER $COMMON_PKG=$PKGVER $KBUILD_PKG"
  TMP="$(mktemp -d "$DIR/.kh.XXXXXX")"
  trap 'rm -rf "$TMP"' EXIT
  # -common must be the flavour package's exact version (its Depends); kbuild is shared by every ABI (>=).
  apt_download "$TMP" "$HDR_PKG=$PKGVER" "$COMMON_PKG=$PKGVER" "$KBUILD_PKG"
  rm -rf "$KH_ROOT"
  mkdir -p "$KH_ROOT"
  for d in "$TMP"/*.deb; do dpkg -x "$d" "$KH_ROOT" || die "dpkg -x $d failed"; done
  rm -rf "$TMP"; trap - EXIT
  [ -s "$KHEADERS/Module.symvers" ] || die "no $KHEADERS/Module.symvers after unpacking the headers"
  echo "$PKGVER" > "$KH_ROOT/.ok"
fi
PKGVER="$(cat "$KH_ROOT/.ok")"
# The flavour Makefile includes the -common one by absolute path (/usr/src/...):
# point it at the unpacked copy (again if the cache dir moved).
grep -qxF "include $COMMON_DIR/Makefile" "$KHEADERS/Makefile" \
  || sed -i "s#^include .*/linux-headers-$ABI-common/Makefile\$#include $COMMON_DIR/Makefile#" "$KHEADERS/Makefile"
grep -qxF "include $COMMON_DIR/Makefile" "$KHEADERS/Makefile" || die "could not fix the include in $KHEADERS/Makefile"

# ------------------------------------------------------------ 2. guest modules from the image package
MODDIR="$DIR/modules/$KVER"
modinfo_field() { tr '\0' '\n' < "$1" | sed -n "s/^$2=//p" | head -n1; }
if [ ! -s "$MODDIR/load-order" ]; then
  log "guest modules from $IMG_PKG"
  TMP="$(mktemp -d "$DIR/.mods.XXXXXX")"
  trap 'rm -rf "$TMP"' EXIT
  apt_download "$TMP" "$IMG_PKG=$PKGVER"
  dpkg -x "$TMP"/*.deb "$TMP/root" || die "dpkg -x $IMG_PKG failed"
  SRCMOD="$TMP/root/lib/modules/$KVER"
  [ -d "$SRCMOD/kernel" ] || die "no lib/modules/$KVER/kernel in $IMG_PKG"
  declare -A PATHOF=()
  while IFS= read -r f; do n="$(basename "$f" .ko)"; PATHOF["${n//-/_}"]="${f#"$SRCMOD"/}"; done \
    < <(find "$SRCMOD/kernel" -name '*.ko')
  declare -A SEEN=()
  ORDER=()
  # visit NAME: its dependencies (modinfo depends=) first, then itself
  visit() {
    local n="${1//-/_}" d
    [ -n "${SEEN[$n]:-}" ] && return 0
    SEEN[$n]=1
    [ -n "${PATHOF[$n]:-}" ] || die "module $n is not in $IMG_PKG (built in? see its modules.builtin)"
    local deps; deps="$(modinfo_field "$SRCMOD/${PATHOF[$n]}" depends)"
    for d in ${deps//,/ }; do visit "$d"; done
    ORDER+=("${PATHOF[$n]}")
  }
  for m in "${WANT_MODULES[@]}"; do visit "$m"; done
  rm -rf "$MODDIR.tmp"
  mkdir -p "$MODDIR.tmp"
  for p in "${ORDER[@]}"; do
    mkdir -p "$MODDIR.tmp/$(dirname "$p")"
    cp "$SRCMOD/$p" "$MODDIR.tmp/$p"
    vm="$(modinfo_field "$SRCMOD/$p" vermagic)"
    [ "${vm%% *}" = "$KVER" ] || die "$p has vermagic '$vm', not $KVER"
  done
  for f in modules.builtin modules.order; do [ -f "$SRCMOD/$f" ] && cp "$SRCMOD/$f" "$MODDIR.tmp/"; done
  printf '%s\n' "${ORDER[@]}" > "$MODDIR.tmp/load-order"
  rm -rf "$MODDIR"; mv "$MODDIR.tmp" "$MODDIR"
  rm -rf "$TMP"; trap - EXIT
fi

# ------------------------------------------------------------ 3. kvmmem.ko
CC="gcc-${MAJMIN%%.*}"
# The headers name the compiler the kernel was built with (CONFIG_CC_VERSION_TEXT): use that one.
want_cc="$(sed -n 's/^CONFIG_CC_VERSION_TEXT="\([^ ]*\) .*/\1/p' "$KHEADERS/.config" | head -n1)"
[ -n "$want_cc" ] && CC="$want_cc"
# need_tool CMD PKG: install PKG when CMD is missing (not with --no-download: then "not provisioned")
need_tool() {
  command -v "$1" >/dev/null 2>&1 && return 0
  [ "$NO_DOWNLOAD" -eq 1 ] && unprovisioned "$1 is missing (apt-get install $2)"
  log "installing $2"
  run_logged env DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "$2" \
    || { run_logged $SUDO apt-get update -q && run_logged env DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "$2"; } \
    || die "apt-get install $2 failed (see $LOG)"
  command -v "$1" >/dev/null 2>&1 || die "$1 still missing after installing $2"
}
need_tool "$CC" "$CC"
need_tool make make
SRC="$ROOT/native/kmod"
FILES=("$SRC/kvmmem.c" "$SRC/kvmmem_mailbox.h" "$SRC/Kbuild" "$SRC/Makefile" "$ROOT/native/include/kvmi_mem.h" "$HERE/provision-kmod.sh")
HASH="$( { cat "${FILES[@]}"; echo "$KVER $PKGVER"; "$CC" --version | head -n1; } | sha256sum | cut -c1-16)"
OUT="$DIR/kmod/$HASH"
if [ ! -s "$OUT/kvmmem.ko" ]; then
  log "building kvmmem.ko for $KVER"
  mkdir -p "$DIR/kmod"
  TMP="$(mktemp -d "$DIR/kmod/.build.XXXXXX")"
  trap 'rm -rf "$TMP"' EXIT
  # Build in a copy: no build products in the source tree; same relative layout for Kbuild's -I.
  mkdir -p "$TMP/native/kmod" "$TMP/native/include"
  cp "$SRC/kvmmem.c" "$SRC/kvmmem_mailbox.h" "$SRC/Kbuild" "$SRC/Makefile" "$TMP/native/kmod/"
  cp "$ROOT/native/include/kvmi_mem.h" "$TMP/native/include/"
  make -C "$KHEADERS" M="$TMP/native/kmod" modules > "$TMP/build.log" 2>&1 \
    || { cat "$TMP/build.log" >&2; die "building kvmmem.ko failed"; }
  vm="$(modinfo_field "$TMP/native/kmod/kvmmem.ko" vermagic)"
  [ "${vm%% *}" = "$KVER" ] || die "kvmmem.ko has vermagic '$vm', not $KVER"
  mkdir -p "$OUT"
  cp "$TMP/native/kmod/kvmmem.ko" "$TMP/build.log" "$OUT/"
  rm -rf "$TMP"; trap - EXIT
fi

echo "KMOD=$OUT/kvmmem.ko"
echo "KHEADERS=$KHEADERS"
echo "MODULES=$MODDIR"
echo "KVER=$KVER"
