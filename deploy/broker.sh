#!/usr/bin/env bash
# Install, start, stop a RabbitMQ node configured from broker_config/.
# Usage: deploy/broker.sh install|start|stop|status|ensure
#   ensure = install if missing, start if no broker answers on AMQP_PORT.
# Environment: NODE (node name, default splitmq), NODE_HOST (the host part of the Erlang node
#   name, default localhost; a cluster over several hosts needs each host's own short name),
#   AMQP_PORT (5672), MGMT_PORT (15672), PROM_PORT (15692), STATE_ROOT (/var/lib/splitmq).
#   Several nodes can run side by side with different NODE and ports (the broker-restart tests
#   do); deploy/cluster.sh makes them one cluster.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
NODE=${NODE:-splitmq}
AMQP_PORT=${AMQP_PORT:-5672}
MGMT_PORT=${MGMT_PORT:-15672}
PROM_PORT=${PROM_PORT:-15692}
STATE_ROOT=${STATE_ROOT:-/var/lib/splitmq}
state="$STATE_ROOT/broker-$NODE"
NODE_HOST=${NODE_HOST:-localhost}
nodename="$NODE@$NODE_HOST"
export RABBITMQ_NODENAME="$nodename" RABBITMQ_NODE_PORT="$AMQP_PORT" \
  RABBITMQ_CONFIG_FILE="$state/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$state/enabled_plugins" \
  RABBITMQ_MNESIA_BASE="$state/mnesia" RABBITMQ_LOG_BASE="$state/log" RABBITMQ_PID_FILE="$state/rabbitmq.pid" \
  RABBITMQ_DIST_PORT=$((AMQP_PORT + 20000))

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
answers() { (exec 3<>"/dev/tcp/127.0.0.1/$AMQP_PORT") 2>/dev/null; }

install() {
  if command -v rabbitmq-server >/dev/null && [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then return; fi
  echo "installing rabbitmq-server (Debian package)..."
  as_root apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q rabbitmq-server >/dev/null
  # The package may start its own default node; ours run with their own names and config.
  as_root service rabbitmq-server stop >/dev/null 2>&1 || true
}

configure() {
  as_root mkdir -p "$state/mnesia" "$state/log"
  sed -e "s|@AMQP_PORT@|$AMQP_PORT|; s|@MGMT_PORT@|$MGMT_PORT|; s|@PROM_PORT@|$PROM_PORT|; s|@DEFINITIONS@|$state/definitions.json|" \
    "$here/broker_config/rabbitmq.conf" | as_root tee "$state/rabbitmq.conf" >/dev/null
  if [ -n "${TLS_DIR:-}" ]; then  # deploy/tls.sh appends the TLS listener for this node
    "$here/deploy/tls.sh" conf "$TLS_DIR" | as_root tee -a "$state/rabbitmq.conf" >/dev/null
  fi
  as_root python3 "$here/deploy/node_definitions.py" "$here/broker_config/definitions.json" "$state/definitions.json" \
    $(ls "$STATE_ROOT"/definitions.d/*.json 2>/dev/null || true)
  as_root cp "$here/broker_config/enabled_plugins" "$state/enabled_plugins"
  as_root chown -R rabbitmq:rabbitmq "$state"
}

start() {
  if answers; then echo "a broker already answers on port $AMQP_PORT"; return; fi
  install
  configure
  as_root rm -f "$state/rabbitmq.pid"  # left by a node that was killed; `wait` below would read it
  echo "starting RabbitMQ node $nodename on port $AMQP_PORT..."
  # The node outlives this script: it must not keep the caller's open files (a lock the caller
  # holds while it runs this script, a pipe), so every descriptor above stderr is closed first.
  (for fd in $(ls /proc/$BASHPID/fd); do [ "$fd" -gt 2 ] && [ "$fd" -lt 255 ] && eval "exec $fd>&-"; done
   as_root rabbitmq-server -detached)
  as_root timeout 120 rabbitmqctl -n "$nodename" wait "$state/rabbitmq.pid" >/dev/null
  echo "RabbitMQ $nodename is up: amqp://localhost:$AMQP_PORT, management :$MGMT_PORT, metrics :$PROM_PORT/metrics"
}

stop() {
  as_root rabbitmqctl -n "$nodename" stop >/dev/null 2>&1 || true
  for _ in $(seq 1 100); do answers || return 0; sleep 0.1; done
  echo "node $nodename still answers after 10s" >&2; return 1
}

case "${1:-}" in
  install) install ;;
  start|ensure) start ;;
  stop) stop ;;
  status) as_root rabbitmqctl -n "$nodename" status ;;
  *) echo "usage: $0 install|start|stop|status|ensure" >&2; exit 2 ;;
esac
