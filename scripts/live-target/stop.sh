#!/usr/bin/env bash
# stop.sh NAME — stop a live target started by boot.sh and remove its files
# (/dev/shm/NAME.ram and the run files). Safe to call when it is not running.
set -uo pipefail

NAME="${1:-}"
[ -n "$NAME" ] || { echo "usage: stop.sh NAME" >&2; exit 2; }
[[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "stop.sh: bad NAME" >&2; exit 2; }

DIR="${KVMMEM_LIVE_DIR:-${HOME:-/root}/.cache/kvmmem-live}"
RUN="$DIR/run"
RAM="/dev/shm/$NAME.ram"
PIDFILE="$RUN/$NAME.pid"

# alive PID: running and not a zombie
alive() {
  local st
  [ -r "/proc/$1/stat" ] || return 1
  st="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
  [ -n "$st" ] && [ "$st" != "Z" ] && [ "$st" != "X" ]
}
# ours PID: the qemu that uses this target's RAM file (guards against pid reuse)
ours() {
  [ -r "/proc/$1/cmdline" ] && tr '\0' '\n' < "/proc/$1/cmdline" | grep -qx -- "memory-backend-file,id=ram,size=[0-9]*M,mem-path=$RAM,share=on"
}

PID="$(cat "$PIDFILE" 2>/dev/null || true)"
if [ -n "$PID" ] && [[ "$PID" =~ ^[0-9]+$ ]] && alive "$PID" && ours "$PID"; then
  kill -TERM "$PID" 2>/dev/null || true
  for _ in $(seq 1 50); do alive "$PID" || break; sleep 0.1; done
  if alive "$PID"; then
    kill -KILL "$PID" 2>/dev/null || true
    for _ in $(seq 1 50); do alive "$PID" || break; sleep 0.1; done
  fi
  if alive "$PID"; then
    echo "stop.sh: qemu pid $PID did not exit" >&2
    exit 1
  fi
  echo "stopped $NAME (pid $PID)"
else
  echo "$NAME not running"
fi
rm -f "$RAM" "$PIDFILE" "$RUN/$NAME.qmp" "$RUN/$NAME.console.log" "$RUN/$NAME.qemu.log"
exit 0
