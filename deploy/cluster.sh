#!/usr/bin/env bash
# A RabbitMQ cluster of splitmq nodes, each one started by deploy/broker.sh from broker_config/.
# Usage:
#   deploy/cluster.sh local start|stop|destroy|status|urls [N]
#       N nodes on this machine (default 3), for tests and trying things out: node i is
#       ${PREFIX}i@localhost (PREFIX splitmq-c) with AMQP on BASE_PORT+i (5800), management on
#       15800+i, metrics on 15900+i. start forms the cluster (nodes 2..N join node 1) and
#       replicates what the boot definitions created before the others joined; destroy also
#       deletes the nodes' state. urls prints the address list for AMQP_URL / --amqp-url.
#   deploy/cluster.sh join SEED
#       The same on N hosts: start this host's node (deploy/broker.sh's NODE, NODE_HOST, ports)
#       and make it join the cluster of node SEED (e.g. splitmq@broker1), then give it a
#       replica of every quorum queue. Run it on every host but the first. Every node needs the
#       same Erlang cookie (/var/lib/rabbitmq/.erlang.cookie, mode 400, owner rabbitmq).
#   deploy/cluster.sh grow NODE
#       Add a replica on NODE to every quorum queue that has none there (a node that joined
#       after the queues were declared, or one that replaced a lost node).
# Environment: STATE_ROOT, NODE, NODE_HOST and the ports as in deploy/broker.sh; PREFIX,
#   BASE_PORT for local clusters. docs/scaling.md explains what the cluster gives a job.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-splitmq-c}
BASE_PORT=${BASE_PORT:-5800}
STATE_ROOT=${STATE_ROOT:-/var/lib/splitmq}
export STATE_ROOT

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
ctl() { as_root rabbitmqctl -q -n "$1" "${@:2}"; }

local_env() {  # local_env I: the deploy/broker.sh environment of local node I
  echo "NODE=$PREFIX$1 NODE_HOST=localhost AMQP_PORT=$((BASE_PORT + $1)) MGMT_PORT=$((BASE_PORT + 10000 + $1))" \
       "PROM_PORT=$((BASE_PORT + 10100 + $1))"
}

member_of() {  # member_of NODE SEED: NODE already belongs to SEED's cluster
  ctl "$1" cluster_status --formatter json 2>/dev/null | grep -q "\"$2\""
}

join() {  # join NODE SEED: a running node leaves its own (fresh) cluster and joins SEED's
  local node=$1 seed=$2
  if member_of "$node" "$seed"; then echo "$node is already in $seed's cluster"; return; fi
  echo "$node joins $seed..."
  ctl "$node" stop_app
  ctl "$node" reset
  ctl "$node" join_cluster "$seed"
  ctl "$node" start_app
  ctl "$node" await_startup
}

grow() {  # grow NODE: a replica on NODE for every quorum queue of every vhost
  as_root rabbitmq-queues -q -n "$1" grow "$1" all --vhost-pattern '.*' --queue-pattern '.*' >/dev/null
  echo "$1 holds a replica of every quorum queue"
}

node_of() { echo "$PREFIX$1@localhost"; }

local_start() {
  local n=$1 i pids=()
  for i in $(seq 1 "$n"); do  # the nodes boot side by side; each one alone at first
    env $(local_env "$i") "$here/deploy/broker.sh" start >/dev/null & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  for i in $(seq 2 "$n"); do join "$(node_of "$i")" "$(node_of 1)"; done
  for i in $(seq 2 "$n"); do grow "$(node_of "$i")"; done
  echo "cluster of $n nodes is up; AMQP_URL=$(local_urls "$n")"
  echo "Prometheus on every node: RABBITMQ_TARGETS=\"$(local_targets "$n")\" deploy/stack.sh start"
}

local_stop() {
  local n=$1 i pids=()
  for i in $(seq 1 "$n"); do env $(local_env "$i") "$here/deploy/broker.sh" stop & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || true; done
}

local_destroy() {
  local n=$1 i
  local_stop "$n"
  for i in $(seq 1 "$n"); do as_root rm -rf "$STATE_ROOT/broker-$PREFIX$i"; done
  echo "removed the state of $n local nodes"
}

local_urls() {
  local n=$1 i out=()
  for i in $(seq 1 "$n"); do out+=("amqp://guest:guest@localhost:$((BASE_PORT + i))/%2F"); done
  (IFS=,; echo "${out[*]}")
}

local_targets() {
  local n=$1 i out=()
  for i in $(seq 1 "$n"); do out+=("localhost:$((BASE_PORT + 10100 + i))"); done
  echo "${out[*]}"
}

local_cmd() {
  local action=${1:-} n=${2:-3}
  case "$action" in
    start) local_start "$n" ;;
    stop) local_stop "$n" ;;
    destroy) local_destroy "$n" ;;
    status) ctl "$(node_of 1)" cluster_status ;;
    urls) local_urls "$n" ;;
    *) echo "usage: $0 local start|stop|destroy|status|urls [N]" >&2; exit 2 ;;
  esac
}

case "${1:-}" in
  local) local_cmd "${2:-}" "${3:-3}" ;;
  join)
    [ $# -ge 2 ] || { echo "usage: $0 join SEED_NODE (e.g. splitmq@broker1)" >&2; exit 2; }
    "$here/deploy/broker.sh" start
    me="${NODE:-splitmq}@${NODE_HOST:-localhost}"
    join "$me" "$2"
    grow "$me" ;;
  grow)
    [ $# -ge 2 ] || { echo "usage: $0 grow NODE" >&2; exit 2; }
    grow "$2" ;;
  *) echo "usage: $0 local start|stop|destroy|status|urls [N] | join SEED | grow NODE" >&2; exit 2 ;;
esac
