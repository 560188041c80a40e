#!/usr/bin/env bash
# Runs a local RabbitMQ for the tests, without systemd: Debian's rabbitmq-server package, started
# detached as its own "rabbitmq" user, listening on 127.0.0.1:5672 only (guest/guest).
#
#   scripts/rabbitmq.sh start     start it unless it already runs; wait until it accepts AMQP
#   scripts/rabbitmq.sh stop      stop it and wait until its process is gone
#   scripts/rabbitmq.sh restart   stop, then start
#   scripts/rabbitmq.sh status    exit 0 if it runs and has booted
#   scripts/rabbitmq.sh vhost NAME        create vhost NAME (guest gets full rights); idempotent
#   scripts/rabbitmq.sh delete-vhost NAME
#   scripts/rabbitmq.sh close-connections NAME   close every client connection to vhost NAME
#
# Needs root (or sudo). Install the package with scripts/setup.sh.
set -euo pipefail

die() { echo "rabbitmq.sh: $*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "must run as root (or with sudo available)"
  exec sudo -E "$0" "$@"
fi
command -v rabbitmq-server >/dev/null && command -v rabbitmqctl >/dev/null ||
  die "rabbitmq-server is not installed (run scripts/setup.sh, or: apt-get install rabbitmq-server)"

# The node name must resolve; fall back to localhost when this machine's short name does not.
short_host=$(hostname -s 2>/dev/null || hostname)
if getent hosts "$short_host" >/dev/null 2>&1; then
  export RABBITMQ_NODENAME="rabbit@$short_host"
else
  export RABBITMQ_NODENAME="rabbit@localhost"
fi
# Loopback only: AMQP, Erlang distribution and epmd.
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT=5672
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
LOG_DIR=/var/log/rabbitmq
START_TIMEOUT_S=90

ctl() { rabbitmqctl -q "$@"; }

booted() { ctl await_startup --timeout 1 >/dev/null 2>&1; }

node_pid() { ctl eval 'os:getpid().' 2>/dev/null | tr -d '"' || true; }

show_logs() {
  local f
  for f in "$LOG_DIR"/*.log "$LOG_DIR"/startup_log "$LOG_DIR"/startup_err; do
    [ -s "$f" ] || continue
    echo "---- last lines of $f ----" >&2
    tail -n 30 "$f" >&2 || true
  done
}

start() {
  if booted; then
    echo "rabbitmq.sh: RabbitMQ ($RABBITMQ_NODENAME) is already running"
    return 0
  fi
  echo "rabbitmq.sh: starting RabbitMQ ($RABBITMQ_NODENAME) on 127.0.0.1:5672"
  # A node that is up but not booted (still starting, or stopping) is waited for, not started twice.
  if [ -z "$(node_pid)" ]; then
    mkdir -p "$LOG_DIR" /var/lib/rabbitmq
    chown rabbitmq:rabbitmq "$LOG_DIR" /var/lib/rabbitmq
    (cd /var/lib/rabbitmq && rabbitmq-server -detached) || { show_logs; die "rabbitmq-server -detached failed"; }
  fi
  # await_startup gives up at once while the node is not reachable yet: poll until it answers.
  local deadline=$((SECONDS + START_TIMEOUT_S))
  until booted; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      show_logs
      die "RabbitMQ did not finish booting within ${START_TIMEOUT_S}s"
    fi
    sleep 0.5
  done
  echo "rabbitmq.sh: RabbitMQ is up"
}

stop() {
  local pid
  pid=$(node_pid)
  if [ -z "$pid" ]; then
    echo "rabbitmq.sh: RabbitMQ ($RABBITMQ_NODENAME) is not running"
    return 0
  fi
  # `shutdown` returns only once the node's OS process has exited.
  ctl shutdown >/dev/null || die "rabbitmqctl shutdown failed"
  echo "rabbitmq.sh: RabbitMQ stopped"
}

vhost() {
  local name=$1
  ctl add_vhost "$name" >/dev/null 2>&1 || ctl list_vhosts name | grep -qxF "$name" || die "cannot create vhost $name"
  ctl set_permissions -p "$name" guest '.*' '.*' '.*' >/dev/null
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) booted ;;
  vhost) [ $# -eq 2 ] || die "usage: $0 vhost NAME"; vhost "$2" ;;
  delete-vhost) [ $# -eq 2 ] || die "usage: $0 delete-vhost NAME"; ctl delete_vhost "$2" >/dev/null 2>&1 || true ;;
  close-connections)
    [ $# -eq 2 ] || die "usage: $0 close-connections NAME"
    ctl close_all_connections --vhost "$2" "closed by scripts/rabbitmq.sh" >/dev/null ;;
  *) die "usage: $0 start|stop|restart|status|vhost NAME|delete-vhost NAME|close-connections NAME" ;;
esac
