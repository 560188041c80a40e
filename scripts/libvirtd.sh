#!/usr/bin/env bash
# Runs a local libvirtd (QEMU driver, qemu:///system) for the tests, without systemd: Debian 12's
# monolithic libvirt 9.0 daemon, in the foreground under `tini -s` (a subreaper, so that QEMU
# processes that libvirt started are reaped at once: PID 1 here reaps orphans only every 1-2 s, and
# libvirt waits for QEMU's pid to vanish at every stop, destroy and managed save), detached from the
# caller (own session, stdio to /var/log/libvirt/libvirtd.log). virtlogd (QEMU's stdio and logs) is
# started first, as a daemon; virtlockd is not needed.
#
#   scripts/libvirtd.sh start     start virtlogd and libvirtd unless libvirtd already answers (one per
#                                 host: a running one is reused); wait until `virsh version` answers
#   scripts/libvirtd.sh stop      SIGTERM libvirtd, wait (then SIGKILL), wait until it is gone; guests
#                                 keep running (a later start re-attaches to them); virtlogd is
#                                 stopped too once no libvirt guest is left
#   scripts/libvirtd.sh restart   stop libvirtd (virtlogd and guests keep running), then start
#   scripts/libvirtd.sh status    exit 0 if libvirtd answers, 1 if not
#   scripts/libvirtd.sh kill      SIGKILL libvirtd (for tests of a libvirtd dying mid-operation);
#                                 guests and virtlogd keep running; `start` brings it back cleanly
#
# Needs root (or sudo). Install the packages with scripts/setup.sh. The QEMU processes run as
# libvirt-qemu unless a domain says otherwise: a domain whose files only root can read (e.g. under
# /root) needs <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>.
set -euo pipefail

die() { echo "libvirtd.sh: $*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "must run as root (or with sudo available)"
  exec sudo -E "$0" "$@"
fi

PACKAGES="libvirt-daemon-system libvirt-daemon-system-sysv libvirt-clients libvirt-daemon-driver-qemu tini"
missing() { die "$1 is not installed: run scripts/setup.sh (or: apt-get install --no-install-recommends $PACKAGES)"; }
command -v libvirtd >/dev/null || missing libvirtd
command -v virtlogd >/dev/null || missing virtlogd
command -v virsh >/dev/null || missing "virsh (libvirt-clients)"
command -v tini >/dev/null || missing tini
compgen -G '/usr/lib/*/libvirt/connection-driver/libvirt_driver_qemu.so' >/dev/null ||
  missing "libvirt's QEMU driver (libvirt-daemon-driver-qemu)"
command -v qemu-system-x86_64 >/dev/null || missing "qemu-system-x86_64 (qemu-system-x86)"

URI=qemu:///system
LOG_DIR=/var/log/libvirt
LOG=$LOG_DIR/libvirtd.log
VIRTLOGD_LOG=$LOG_DIR/virtlogd.log
LIBVIRTD_PIDFILE=/run/libvirtd.pid
VIRTLOGD_PIDFILE=/run/virtlogd.pid
VIRTLOGD_SOCK=/run/libvirt/virtlogd-sock
START_TIMEOUT_S=30
STOP_TIMEOUT_S=20
# The environment libvirtd (and so QEMU) gets: none of the caller's.
DAEMON_ENV=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)

# answers: libvirtd accepts a connection and serves the QEMU driver (bounded: a hung daemon is "no").
answers() { timeout 10 virsh -q -c "$URI" version >/dev/null 2>&1; }

# pid_of NAME PIDFILE: the pid of the running NAME, from its pid file, else from the process table.
pid_of() {
  local name=$1 pidfile=$2 pid=""
  if [ -r "$pidfile" ]; then pid=$(cat "$pidfile" 2>/dev/null) || true; fi
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
    echo "$pid"
    return 0
  fi
  pgrep -x -o "$name" 2>/dev/null || true
}
libvirtd_pid() { pid_of libvirtd "$LIBVIRTD_PIDFILE"; }
virtlogd_pid() { pid_of virtlogd "$VIRTLOGD_PIDFILE"; }

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null && [ "$(cat "/proc/$1/stat" 2>/dev/null | awk '{print $3}')" != Z ]; }

# wait_gone PID SECONDS: 0 once PID is gone (or a zombie), 1 on timeout.
wait_gone() {
  local pid=$1 deadline=$((SECONDS + $2))
  while alive "$pid"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

# show_log FILE: its lines since this script's last "starting" mark (the last 30 at most).
show_log() {
  [ -s "$1" ] || return 0
  echo "---- $1 (last start) ----" >&2
  awk '/libvirtd\.sh: starting/ { n = 0 } { line[n++] = $0 } END { for (i = (n > 30 ? n - 30 : 0); i < n; i++) print line[i] }' "$1" >&2 || true
}

# detach CMD...: run CMD in its own session, stdin from /dev/null, no inherited descriptor past 2.
detach() {
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      if [ "$fd" -gt 2 ] 2>/dev/null; then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    cd /
    exec setsid "${DAEMON_ENV[@]}" "$@" </dev/null
  ) &
}

# Guests that libvirt started and that still run (their pid files under /run/libvirt/qemu).
running_guests() {
  local f pid n=0
  for f in /run/libvirt/qemu/*.pid; do
    [ -e "$f" ] || continue
    [ "${f##*/}" != driver.pid ] || continue
    pid=$(cat "$f" 2>/dev/null) || continue # (no newline at its end: not `read`)
    case "$(cat "/proc/$pid/comm" 2>/dev/null)" in qemu-system-*) n=$((n + 1)) ;; esac
  done
  echo "$n"
}

start_virtlogd() {
  local pid deadline
  pid=$(virtlogd_pid)
  if alive "$pid" && [ -S "$VIRTLOGD_SOCK" ]; then return 0; fi
  if ! alive "$pid"; then
    printf '%s libvirtd.sh: starting virtlogd\n' "$(date -u '+%F %T')" >>"$VIRTLOGD_LOG"
    detach virtlogd >>"$VIRTLOGD_LOG" 2>&1
  fi
  deadline=$((SECONDS + 10))
  until pid=$(virtlogd_pid) && alive "$pid" && [ -S "$VIRTLOGD_SOCK" ]; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      show_log "$VIRTLOGD_LOG"
      die "virtlogd did not start within 10s (QEMU guests cannot start without $VIRTLOGD_SOCK)"
    fi
    sleep 0.1
  done
}

stop_virtlogd() {
  local pid
  pid=$(virtlogd_pid)
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  wait_gone "$pid" 10 || { kill -KILL "$pid" 2>/dev/null || true; wait_gone "$pid" 5 || true; }
}

start() {
  local pid deadline started=""
  if answers; then
    echo "libvirtd.sh: libvirtd is already running (pid $(libvirtd_pid))"
    return 0
  fi
  mkdir -p "$LOG_DIR" /var/lib/libvirt /var/cache/libvirt
  start_virtlogd
  pid=$(libvirtd_pid)
  if alive "$pid"; then
    # Up but not answering yet (still starting): wait for it, do not start a second one.
    echo "libvirtd.sh: waiting for the running libvirtd (pid $pid) to answer"
  else
    echo "libvirtd.sh: starting libvirtd ($URI) under tini"
    printf '%s libvirtd.sh: starting libvirtd\n' "$(date -u '+%F %T')" >>"$LOG"
    detach tini -s -- libvirtd >>"$LOG" 2>&1
    started=$!
  fi
  deadline=$((SECONDS + START_TIMEOUT_S))
  until answers; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      show_log "$LOG"
      die "libvirtd did not answer within ${START_TIMEOUT_S}s (log: $LOG)"
    fi
    if [ -n "$started" ] && ! alive "$started" && ! alive "$(libvirtd_pid)"; then
      show_log "$LOG"
      die "libvirtd exited at start (log: $LOG)"
    fi
    sleep 0.2
  done
  echo "libvirtd.sh: libvirtd is up (pid $(libvirtd_pid))"
}

# stop_libvirtd SIGNAL: end libvirtd with SIGNAL (TERM: then KILL after STOP_TIMEOUT_S).
stop_libvirtd() {
  local sig=$1 pid
  pid=$(libvirtd_pid)
  if ! alive "$pid"; then
    echo "libvirtd.sh: libvirtd is not running"
    return 0
  fi
  kill "-$sig" "$pid" 2>/dev/null || true
  if ! wait_gone "$pid" "$STOP_TIMEOUT_S"; then
    echo "libvirtd.sh: libvirtd (pid $pid) did not exit within ${STOP_TIMEOUT_S}s of SIG$sig: SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 10 || die "libvirtd (pid $pid) survived SIGKILL"
  fi
  printf '%s libvirtd.sh: libvirtd (pid %s) ended by SIG%s\n' "$(date -u '+%F %T')" "$pid" "$sig" >>"$LOG"
  echo "libvirtd.sh: libvirtd (pid $pid) ended by SIG$sig"
}

stop() {
  local guests
  stop_libvirtd TERM
  guests=$(running_guests)
  if [ "$guests" -eq 0 ]; then
    stop_virtlogd
  else
    echo "libvirtd.sh: $guests libvirt guest(s) still running: virtlogd left running for them"
  fi
}

status() {
  if answers; then
    echo "libvirtd.sh: libvirtd is running (pid $(libvirtd_pid))"
    return 0
  fi
  echo "libvirtd.sh: libvirtd is not running"
  return 1
}

# One start/stop/kill at a time (parallel test workers); the lock's descriptor is not passed to the
# daemons (detach closes it).
if [ "${1:-start}" != status ]; then
  exec 9>>/run/libvirtd.sh.lock
  flock -w 120 9 || die "another scripts/libvirtd.sh still holds /run/libvirtd.sh.lock after 120s"
fi

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  restart) stop_libvirtd TERM; start ;;
  status) status ;;
  kill) stop_libvirtd KILL ;;
  *) die "usage: $0 start|stop|restart|status|kill" ;;
esac
