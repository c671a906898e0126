#!/usr/bin/env bash
# The monitoring stack on one Debian/Ubuntu host: RabbitMQ (deploy/broker.sh, with the
# rabbitmq_prometheus plugin on :15692), Prometheus (:9090) with deploy/prometheus/, and a
# Pushgateway (:9091) for edge workers behind NAT that Prometheus cannot scrape.
# Usage: deploy/stack.sh install|start|stop [--with-broker]|status|config
#   install  apt-installs prometheus and prometheus-pushgateway when missing
#   start    installs what is missing, then starts what is not running (running it twice is harmless)
#   stop     stops Prometheus and the Pushgateway; the RabbitMQ node only with --with-broker,
#            since trainers, workers and tests share it
#   config   prints the path of the Prometheus configuration start uses (see RABBITMQ_TARGETS)
# Prometheus and the Pushgateway run as plain background processes (no systemd needed), with
# pid files, logs and data under $MON_STATE.
# Environment: PROMETHEUS_PORT (9090), PUSHGATEWAY_PORT (9091), PROMETHEUS_CONFIG
#   (deploy/prometheus/prometheus.yml), STATE_ROOT (/var/lib/splitmq), MON_STATE
#   ($STATE_ROOT/monitoring), NO_BROKER=1 (leave the broker alone on start), and
#   deploy/broker.sh's NODE, AMQP_PORT, MGMT_PORT, PROM_PORT.
#   RABBITMQ_TARGETS ("host:port ..."): a cluster's nodes, each one's metrics endpoint (every
#   node reports only itself); Prometheus then scrapes all of them instead of localhost:15692.
#   deploy/cluster.sh prints the value for its local clusters.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PROMETHEUS_PORT=${PROMETHEUS_PORT:-9090}
PUSHGATEWAY_PORT=${PUSHGATEWAY_PORT:-9091}
PROMETHEUS_CONFIG=${PROMETHEUS_CONFIG:-$here/deploy/prometheus/prometheus.yml}
STATE_ROOT=${STATE_ROOT:-/var/lib/splitmq}
MON_STATE=${MON_STATE:-$STATE_ROOT/monitoring}
export STATE_ROOT

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian installs the binaries under these names; the upstream tarballs use the same for prometheus.
PROMETHEUS_BIN=${PROMETHEUS_BIN:-prometheus}
PUSHGATEWAY_BIN=${PUSHGATEWAY_BIN:-prometheus-pushgateway}

install() {
  local missing=()
  command -v "$PROMETHEUS_BIN" >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
  command -v "$PUSHGATEWAY_BIN" >/dev/null || missing+=(prometheus-pushgateway)
  [ ${#missing[@]} = 0 ] && return
  echo "installing ${missing[*]} (Debian packages)..."
  as_root apt-get update -q >/dev/null
  # policy-rc.d 101: the packages must not start their own instances (ours run from here, with our config).
  local policy=/usr/sbin/policy-rc.d created=
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod +x "$policy"; created=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
    || { [ -n "$created" ] && as_root rm -f "$policy"; return 1; }
  [ -n "$created" ] && as_root rm -f "$policy"
  return 0
}

pid_of() {  # the pid in $1's pid file, if that process is alive
  local file="$MON_STATE/$1.pid" pid
  [ -f "$file" ] || return 1
  pid=$(cat "$file")
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

ready() {  # ready URL: HTTP 200 from URL
  python3 - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
EOF
}

wait_ready() {  # wait_ready NAME URL: poll until it answers, up to 60 s
  for _ in $(seq 1 300); do
    ready "$2" && return 0
    pid_of "$1" >/dev/null || { echo "$1 exited; see $MON_STATE/$1.log" >&2; tail -5 "$MON_STATE/$1.log" >&2; return 1; }
    sleep 0.2
  done
  echo "$1 not ready at $2 after 60 s; see $MON_STATE/$1.log" >&2; return 1
}

launch() {  # launch NAME READY_URL COMMAND...: start in the background unless already running
  local name=$1 url=$2; shift 2
  if pid=$(pid_of "$name"); then echo "$name already running (pid $pid)"; return; fi
  if ready "$url"; then echo "something else already answers at $url; not starting $name" >&2; return 1; fi
  # setsid: the process outlives this shell and the caller's terminal or test session; it
  # writes its own pid (setsid may fork, so $! is not always the server's pid).
  rm -f "$MON_STATE/$name.pid"
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$MON_STATE/$name.pid" "$@" >>"$MON_STATE/$name.log" 2>&1 </dev/null &
  for _ in $(seq 1 50); do [ -s "$MON_STATE/$name.pid" ] && break; sleep 0.1; done
  wait_ready "$name" "$url"
  echo "$name is up: ${url%/-/ready}"
}

config() {  # the configuration Prometheus runs with: PROMETHEUS_CONFIG, scraping RABBITMQ_TARGETS if set
  if [ -z "${RABBITMQ_TARGETS:-}" ]; then echo "$PROMETHEUS_CONFIG"; return; fi
  local dir="$MON_STATE/prometheus-config"
  mkdir -p "$dir"
  cp "$(dirname "$PROMETHEUS_CONFIG")"/*.yml "$dir/"  # the rule files it names, next to it
  # The broker's default target, in flow style ["localhost:15692"] or as a block item, becomes the list.
  python3 - "$PROMETHEUS_CONFIG" "$dir/prometheus.yml" $RABBITMQ_TARGETS <<'EOF'
import re, sys
src, out, targets = sys.argv[1], sys.argv[2], sys.argv[3:]
text = open(src).read().replace('["localhost:15692"]', "[" + ", ".join(f'"{t}"' for t in targets) + "]")
text = re.sub(r"^(\s*)- localhost:15692$", lambda m: "\n".join(f"{m.group(1)}- {t}" for t in targets), text,
              flags=re.M)
open(out, "w").write(text)
EOF
  echo "$dir/prometheus.yml"
}

start() {
  install
  [ "${NO_BROKER:-0}" = 1 ] || "$here/deploy/broker.sh" start
  mkdir -p "$MON_STATE/prometheus-data" "$MON_STATE/pushgateway"
  PROMETHEUS_CONFIG=$(config)
  promtool check config "$PROMETHEUS_CONFIG" >/dev/null
  launch pushgateway "http://127.0.0.1:$PUSHGATEWAY_PORT/-/ready" "$PUSHGATEWAY_BIN" \
    --web.listen-address=":$PUSHGATEWAY_PORT" \
    --persistence.file="$MON_STATE/pushgateway/metrics.store" --persistence.interval=1m
  # --web.enable-lifecycle: `curl -X POST :9090/-/reload` picks up edited rules without a restart.
  launch prometheus "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" "$PROMETHEUS_BIN" \
    --config.file="$PROMETHEUS_CONFIG" --storage.tsdb.path="$MON_STATE/prometheus-data" \
    --storage.tsdb.retention.time=15d --web.listen-address=":$PROMETHEUS_PORT" --web.enable-lifecycle
}

halt() {  # halt NAME: SIGTERM, wait up to 30 s (Prometheus flushes its head block), then SIGKILL
  local pid
  if ! pid=$(pid_of "$1"); then rm -f "$MON_STATE/$1.pid"; echo "$1 not running"; return; fi
  kill "$pid"
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then echo "$1 (pid $pid) ignored SIGTERM; killing it" >&2; kill -9 "$pid"; fi
  rm -f "$MON_STATE/$1.pid"
  echo "$1 stopped"
}

stop() {
  halt prometheus
  halt pushgateway
  if [ "${1:-}" = --with-broker ]; then "$here/deploy/broker.sh" stop; fi
}

status() {
  local rc=0 name url
  for name in prometheus pushgateway; do
    [ $name = prometheus ] && url="http://127.0.0.1:$PROMETHEUS_PORT" || url="http://127.0.0.1:$PUSHGATEWAY_PORT"
    if pid=$(pid_of $name) && ready "$url/-/ready"; then echo "$name: running (pid $pid) at $url"
    else echo "$name: not running"; rc=3; fi
  done
  if ready "http://127.0.0.1:${PROM_PORT:-15692}/metrics"; then echo "rabbitmq: metrics at :${PROM_PORT:-15692}/metrics"
  else echo "rabbitmq: no metrics endpoint on :${PROM_PORT:-15692}"; rc=3; fi
  return $rc
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop "${2:-}" ;;
  status) status ;;
  config) config ;;
  *) echo "usage: $0 install|start|stop [--with-broker]|status|config" >&2; exit 2 ;;
esac
