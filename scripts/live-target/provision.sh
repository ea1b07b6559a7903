#!/usr/bin/env bash
# Provision the "live target": a stock Debian cloud kernel + a tiny busybox
# initramfs that QEMU (TCG) can boot with its RAM in a shared file under
# /dev/shm. See shared/reference/live-target.md for the measured recipe.
#
# Idempotent: re-running when everything is in place does no apt work and
# exits in well under a second.
#
# Env:
#   KVMMEM_LIVE_DIR   cache dir (default: $HOME/.cache/kvmmem-live)
#
# Output (stdout, one per line): DIR=..., KERNEL=..., INITRD=..., QEMU=...
set -euo pipefail

die() { echo "provision.sh: error: $*" >&2; exit 1; }
log() { echo "provision.sh: $*" >&2; }

DIR="${KVMMEM_LIVE_DIR:-${HOME:-/root}/.cache/kvmmem-live}"
KERNEL="$DIR/vmlinuz"
INITRD="$DIR/initrd.cpio.gz"
INIT_SRC="$DIR/init.sh"

mkdir -p "$DIR" "$DIR/run" || die "cannot create cache dir $DIR"
DIR="$(cd "$DIR" && pwd)"
KERNEL="$DIR/vmlinuz"; INITRD="$DIR/initrd.cpio.gz"; INIT_SRC="$DIR/init.sh"

# Serialize concurrent provisioning runs on the same cache dir.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$DIR/.provision.lock"
  flock -w 600 9 || die "timed out waiting for another provision.sh run ($DIR/.provision.lock)"
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 && SUDO="sudo" || true
fi

APT_LOG="$DIR/provision.log"
: > "$APT_LOG"
# run_logged CMD...: run quietly, keep the output in $APT_LOG, show its tail on failure
run_logged() {
  echo "+ $*" >> "$APT_LOG"
  if ! "$@" >> "$APT_LOG" 2>&1; then
    tail -n 20 "$APT_LOG" >&2
    return 1
  fi
}

APT_OPTS=(-q)
# apt-get download drops privileges to _apt, which cannot write into a cache dir
# under /root; as root, keep the download as root (avoids a noisy warning).
[ "$(id -u)" -eq 0 ] && APT_OPTS+=(-o APT::Sandbox::User=root)

APT_UPDATED=0
apt_update_once() {
  if [ "$APT_UPDATED" -eq 0 ]; then
    log "apt-get update"
    run_logged $SUDO apt-get update -q || die "apt-get update failed (see $APT_LOG)"
    APT_UPDATED=1
  fi
}

apt_install() {
  # apt_install PKG... ; retries once after apt-get update (stale/empty lists)
  if ! run_logged env DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "$@"; then
    apt_update_once
    run_logged env DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "$@" \
      || die "apt-get install $* failed (see $APT_LOG)"
  fi
}

# ---------------------------------------------------------------- qemu
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || die "qemu-system-x86_64 missing and no apt-get to install it"
  log "installing qemu-system-x86"
  apt_install qemu-system-x86
  command -v qemu-system-x86_64 >/dev/null 2>&1 || die "qemu-system-x86_64 still missing after install"
fi
QEMU="$(command -v qemu-system-x86_64)"

# ---------------------------------------------------------------- kernel + busybox
BUSYBOX="$DIR/busybox-root/bin/busybox"

resolve_image_pkg() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | awk '/^ *Depends: *linux-image-[0-9]/ { print $2; exit }'
}

if [ ! -s "$KERNEL" ] || [ ! -x "$BUSYBOX" ]; then
  command -v apt-get >/dev/null 2>&1 || die "apt-get not available; cannot download kernel/busybox"
  IMG_PKG="$(resolve_image_pkg || true)"
  if [ -z "$IMG_PKG" ]; then
    apt_update_once
    IMG_PKG="$(resolve_image_pkg || true)"
  fi
  [ -n "$IMG_PKG" ] || die "could not resolve versioned image package from linux-image-cloud-amd64 (apt-cache depends)"
  log "kernel image package: $IMG_PKG"

  DEBS="$DIR/debs"
  mkdir -p "$DEBS"
  TMPD="$(mktemp -d "$DIR/dl.XXXXXX")"
  need=()
  ls "$DEBS/${IMG_PKG}"_*.deb >/dev/null 2>&1 || need+=("$IMG_PKG")
  ls "$DEBS"/busybox-static_*.deb >/dev/null 2>&1 || need+=(busybox-static)
  if [ "${#need[@]}" -gt 0 ]; then
    log "apt-get download ${need[*]}"
    if ! (cd "$TMPD" && run_logged apt-get "${APT_OPTS[@]}" download "${need[@]}"); then
      apt_update_once
      (cd "$TMPD" && run_logged apt-get "${APT_OPTS[@]}" download "${need[@]}") \
        || { rm -rf "$TMPD"; die "apt-get download ${need[*]} failed (see $APT_LOG)"; }
    fi
    mv "$TMPD"/*.deb "$DEBS/"
  fi
  rm -rf "$TMPD"

  IMG_DEB="$(ls -1 "$DEBS/${IMG_PKG}"_*.deb | tail -n1)"
  BB_DEB="$(ls -1 "$DEBS"/busybox-static_*.deb | tail -n1)"

  rm -rf "$DIR/kernel-root" "$DIR/busybox-root"
  log "dpkg -x $(basename "$IMG_DEB")"
  dpkg -x "$IMG_DEB" "$DIR/kernel-root" || die "dpkg -x $IMG_DEB failed"
  dpkg -x "$BB_DEB" "$DIR/busybox-root" || die "dpkg -x $BB_DEB failed"

  VMLINUZ="$(ls -1 "$DIR"/kernel-root/boot/vmlinuz-* 2>/dev/null | head -n1)"
  [ -n "$VMLINUZ" ] && [ -s "$VMLINUZ" ] || die "no /boot/vmlinuz-* in $IMG_DEB"
  [ -x "$BUSYBOX" ] || die "no bin/busybox in $BB_DEB"
  # Only /boot (vmlinuz, config) is needed; the modules are ~100 MB.
  find "$DIR/kernel-root" -mindepth 1 -maxdepth 1 ! -name boot -exec rm -rf {} +
  ln -sfn "${VMLINUZ#"$DIR"/}" "$KERNEL.tmp" && mv -f "$KERNEL.tmp" "$KERNEL"
  echo "$IMG_PKG" > "$DIR/kernel-package"
  # The debs are no longer needed once extracted.
  rm -rf "$DEBS"
  rm -f "$INITRD"   # rebuild the initramfs against the (possibly new) busybox
fi

# ---------------------------------------------------------------- initramfs
# /init: busybox sh. Prints machine-parseable truth lines to the console
# (ttyS0), then loops forever writing a changing marker into guest RAM.
IFS= read -r -d '' INIT_SCRIPT <<'INIT' || true
#!/bin/sh
# kvmmem live-target init (generated by scripts/live-target/provision.sh)
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
mount -t tmpfs tmpfs /tmp
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
# Keep kernel messages from interleaving with our lines (still in the log buffer).
echo 1 > /proc/sys/kernel/printk
echo 0 > /proc/sys/kernel/kptr_restrict
echo "KVMMEM-TRUTH banner $(cat /proc/version)"
kc=$(grep ' : Kernel code$' /proc/iomem | head -n1 | sed 's/^ *//; s/-.*//')
echo "KVMMEM-TRUTH kernel_code $kc"
# One pass over kallsyms, exact-name matches (core kernel, so first hit wins).
# A single prefix-factored sed regex: ~0.4 s under TCG, vs ~2 s for awk or an
# unfactored alternation.
sed -n 's/^\([0-9a-f]*\) [A-Za-z] \(_s\?text\|_etext\|_[se]data\|_end\|linux_banner\|init_\(uts_ns\|task\|mm\|top_pgt\)\|jiffies\(_64\)\?\|page_offset_base\|vmalloc_base\|vmemmap_base\|phys_base\|__per_cpu_offset\)$/KVMMEM-TRUTH sym \2 \1/p' /proc/kallsyms
# Optional extra truth: an initramfs appended by a test may carry /kvmmem-truth.sh.
[ -f /kvmmem-truth.sh ] && . /kvmmem-truth.sh
echo "KVMMEM-TRUTH ready"
i=0
while :; do
  i=$((i+1))
  LABMARK=$(printf 'LABMARK-%06d' "$i")
  echo "$LABMARK" > /tmp/labmark
  echo "$LABMARK"
  sleep 1
done
INIT

need_initrd=1
if [ -s "$INITRD" ] && [ -f "$INIT_SRC" ] && printf '%s\n' "$INIT_SCRIPT" | cmp -s - "$INIT_SRC"; then
  need_initrd=0
fi

if [ "$need_initrd" -eq 1 ]; then
  if ! command -v cpio >/dev/null 2>&1; then
    log "installing cpio"
    apt_install cpio
  fi
  command -v gzip >/dev/null 2>&1 || die "gzip missing"
  log "building initramfs"
  STAGE="$(mktemp -d "$DIR/initramfs.XXXXXX")"
  trap 'rm -rf "$STAGE"' EXIT
  mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp}
  cp "$BUSYBOX" "$STAGE/bin/busybox"
  ln -s busybox "$STAGE/bin/sh"
  # The kernel opens /dev/console on the rootfs before running /init.
  mknod -m 600 "$STAGE/dev/console" c 5 1 2>/dev/null || log "warning: mknod /dev/console failed (init re-opens it after mounting devtmpfs)"
  mknod -m 666 "$STAGE/dev/null" c 1 3 2>/dev/null || true
  printf '%s\n' "$INIT_SCRIPT" > "$STAGE/init"
  chmod 0755 "$STAGE/init"
  (cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -9n) > "$INITRD.tmp" \
    || die "building initramfs failed"
  mv -f "$INITRD.tmp" "$INITRD"
  printf '%s\n' "$INIT_SCRIPT" > "$INIT_SRC.tmp" && mv -f "$INIT_SRC.tmp" "$INIT_SRC"
  rm -rf "$STAGE"; trap - EXIT
fi

[ -s "$KERNEL" ] || die "kernel missing at $KERNEL"
[ -s "$INITRD" ] || die "initrd missing at $INITRD"

echo "DIR=$DIR"
echo "KERNEL=$KERNEL"
echo "INITRD=$INITRD"
echo "QEMU=$QEMU"
# Lab agent (native/lab/, cached by source hash); optional: report and continue.
bash "$(dirname "${BASH_SOURCE[0]}")/../lab/build-agent.sh" >/dev/null 2>"$DIR/agent-build.log" && log "lab agent built" || log "warning: lab agent not built (see $DIR/agent-build.log); the live target works without it"
# Guest module kvmmem.ko + kernel headers + the lab's guest modules (scripts/lab/provision-kmod.sh, cached); optional: report and continue.
bash "$(dirname "${BASH_SOURCE[0]}")/../lab/provision-kmod.sh" >/dev/null 2>"$DIR/kmod-build.log" && log "kvmmem.ko built" || log "warning: kvmmem.ko not built (see $DIR/kmod-build.log); the live target works without it"
# The two-VM lab's introspector (virtiofsd, runner, initramfs): scripts/lab/provision-vm.sh.
bash "$(dirname "${BASH_SOURCE[0]}")/../lab/provision-vm.sh" >/dev/null 2>"$DIR/lab-vm.log" && log "lab introspector provisioned" || { cat "$DIR/lab-vm.log" >&2; log "warning: lab introspector not provisioned (see $DIR/lab-vm.log); the live target works without it"; }
