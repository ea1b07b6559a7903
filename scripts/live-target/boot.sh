#!/usr/bin/env bash
# boot.sh NAME [MEM_MB] — boot the provisioned live target in the background.
#
# QEMU (TCG) runs with its guest RAM in /dev/shm/NAME.ram (share=on), so the
# file holds the live guest-physical memory (file offset = guest-physical
# address, below the PCI hole). Waits up to 60 s (KVMMEM_LIVE_BOOT_TIMEOUT)
# for the guest's "KVMMEM-TRUTH ready" line, then prints
#   RAM=... CONSOLE=... QMP=... PID=...
# one per line. Stop it with stop.sh NAME.
set -euo pipefail

die() { echo "boot.sh: error: $*" >&2; exit 1; }

NAME="${1:-}"
MEM="${2:-256}"
[ -n "$NAME" ] || die "usage: boot.sh NAME [MEM_MB]"
[[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "NAME must match [A-Za-z0-9._-]+"
[[ "$MEM" =~ ^[0-9]+$ ]] && [ "$MEM" -ge 64 ] && [ "$MEM" -le 2816 ] \
  || die "MEM_MB must be an integer in 64..2816 (file offset = GPA only below the PCI hole)"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="${KVMMEM_LIVE_DIR:-${HOME:-/root}/.cache/kvmmem-live}"
KERNEL="$DIR/vmlinuz"
INITRD="$DIR/initrd.cpio.gz"
[ -s "$KERNEL" ] && [ -s "$INITRD" ] && command -v qemu-system-x86_64 >/dev/null 2>&1 \
  || die "live target not provisioned; run: bash scripts/live-target/provision.sh"

RUN="$DIR/run"
mkdir -p "$RUN"
RAM="/dev/shm/$NAME.ram"
CONSOLE="$RUN/$NAME.console.log"
QMP="$RUN/$NAME.qmp"
PIDFILE="$RUN/$NAME.pid"
QLOG="$RUN/$NAME.qemu.log"

# Refuse to clobber a running instance; clear leftovers of a dead one.
if [ -s "$PIDFILE" ]; then
  old="$(cat "$PIDFILE" 2>/dev/null || true)"
  if [ -n "$old" ] && [ -r "/proc/$old/cmdline" ] && tr '\0' ' ' < "/proc/$old/cmdline" | grep -q "mem-path=$RAM"; then
    die "live target '$NAME' is already running (pid $old); stop it with: bash $HERE/stop.sh $NAME"
  fi
fi
rm -f "$RAM" "$CONSOLE" "$QMP" "$PIDFILE" "$QLOG"

QEMU_PID=""
cleanup_fail() {
  if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
    kill -KILL "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
  fi
  rm -f "$RAM" "$QMP" "$PIDFILE"
}

setsid qemu-system-x86_64 \
  -accel tcg -smp 1 -m "${MEM}M" \
  -object "memory-backend-file,id=ram,size=${MEM}M,mem-path=$RAM,share=on" \
  -machine q35,memory-backend=ram -nodefaults -display none -no-reboot \
  -kernel "$KERNEL" -initrd "$INITRD" -append 'console=ttyS0 panic=-1' \
  -serial "file:$CONSOLE" -qmp "unix:$QMP,server,nowait" -pidfile "$PIDFILE" \
  </dev/null >"$QLOG" 2>&1 &
QEMU_PID=$!
trap 'cleanup_fail; exit 130' INT TERM

TIMEOUT="${KVMMEM_LIVE_BOOT_TIMEOUT:-60}"
deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
  if ! kill -0 "$QEMU_PID" 2>/dev/null; then
    wait "$QEMU_PID" 2>/dev/null && rc=0 || rc=$?
    echo "boot.sh: qemu exited early (status $rc). qemu log:" >&2
    cat "$QLOG" >&2 || true
    echo "boot.sh: console tail:" >&2
    tail -n 30 "$CONSOLE" >&2 2>/dev/null || true
    cleanup_fail
    exit 1
  fi
  if [ -f "$CONSOLE" ] && grep -q 'KVMMEM-TRUTH ready' "$CONSOLE"; then
    break
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "boot.sh: timed out after ${TIMEOUT}s waiting for 'KVMMEM-TRUTH ready'; console tail:" >&2
    tail -n 30 "$CONSOLE" >&2 2>/dev/null || true
    cleanup_fail
    exit 1
  fi
  sleep 0.1
done
# QEMU writes the pidfile at startup; it is the same process as $QEMU_PID
# (setsid execs in place when not a group leader; fall back to our $!).
PID="$(cat "$PIDFILE" 2>/dev/null || true)"
[ -n "$PID" ] || { PID="$QEMU_PID"; echo "$PID" > "$PIDFILE"; }
trap - INT TERM

echo "RAM=$RAM"
echo "CONSOLE=$CONSOLE"
echo "QMP=$QMP"
echo "PID=$PID"
echo "MEM_MB=$MEM"
