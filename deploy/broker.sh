#!/usr/bin/env bash
# Install, start, stop a RabbitMQ node configured from broker_config/.
# Usage: deploy/broker.sh install|start|stop|status|ensure
#   ensure = install if missing, start if no broker answers on AMQP_PORT.
# Environment: NODE (node name, default splitmq), NODE_HOST (the host part of the Erlang node
#   name, default localhost; a cluster over several hosts needs each host's own short name),
#   AMQP_PORT (5672), MGMT_PORT (15672), PROM_PORT (15692), STATE_ROOT (/var/lib/splitmq).
#   Several nodes can run side by side with different NODE and ports (the broker-restart tests
#   do); deploy/cluster.sh makes them one cluster.
# Runs as root or as a user with sudo: start then runs itself as root, passing these settings on.
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
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server >/dev/null
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

# The node's limit of open files. RabbitMQ hands out sockets and files within it (its
# file_handle_cache) and counts a few for every quorum queue: at a shell's usual 1024, a node
# holding about 300 queues (some 30 jobs) queues every new connection's socket forever, so
# clients time out in the AMQP handshake while the node looks idle (seen here, 2026-11-24).
# Debian's systemd unit gives 65536; a node this script starts as root gets as much, up to the hard limit.
OPEN_FILES=${OPEN_FILES:-65536}

raise_open_files() {
  local hard want=$OPEN_FILES
  hard=$(ulimit -Hn)
  if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then want=$hard; fi
  ulimit -n "$want" 2>/dev/null || true
  if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 4096 ]; then
    echo "warning: node $nodename may open only $(ulimit -n) files (raise the hard limit, ulimit -Hn): it stops accepting connections at a few hundred queues" >&2
  fi
}

start() {
  if answers; then echo "a broker already answers on port $AMQP_PORT"; return; fi
  if [ "$(id -u)" != 0 ]; then  # the node is set up and started as root: sudo drops the environment, so pass it
    local settings=(NODE="$NODE" NODE_HOST="$NODE_HOST" AMQP_PORT="$AMQP_PORT" MGMT_PORT="$MGMT_PORT"
                    PROM_PORT="$PROM_PORT" STATE_ROOT="$STATE_ROOT" OPEN_FILES="$OPEN_FILES") name
    for name in $(compgen -e | grep '^TLS_'); do settings+=("$name=${!name}"); done  # deploy/tls.sh conf's
    exec sudo env "${settings[@]}" "$here/deploy/broker.sh" start
  fi
  install
  configure
  as_root rm -f "$state/rabbitmq.pid"  # left by a node that was killed; `wait` below would read it
  echo "starting RabbitMQ node $nodename on port $AMQP_PORT..."
  # The node outlives this script: it must not keep the caller's open files (a lock the caller
  # holds while it runs this script, a pipe), so every descriptor above stderr is closed first.
  (for fd in $(ls /proc/$BASHPID/fd); do [ "$fd" -gt 2 ] && [ "$fd" -lt 255 ] && eval "exec $fd>&-"; done
   raise_open_files  # as the rabbitmq user, without su: su's PAM session resets the limit to 1024
   cd /var/lib/rabbitmq && HOME=/var/lib/rabbitmq setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
     rabbitmq-server -detached)
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
