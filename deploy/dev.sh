#!/usr/bin/env bash
# The README's two commands. Idempotent: a second run reinstalls nothing.
#   deploy/dev.sh demo [demo flags]   set up, then run a split-learning training (splitmq demo)
#   deploy/dev.sh test [pytest args]  set up, then run the test suite
# Set-up: Python virtualenv in .venv with the pinned dependencies, and a RabbitMQ node with
# broker_config/ unless a broker already answers at AMQP_URL (default amqp://localhost:5672).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
stamp="$venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

setup_python() {
  if [ -f "$stamp" ]; then return; fi
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    as_root apt-get update -q >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv python3-pip >/dev/null
  fi
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  echo "installing Python dependencies into $venv (torch takes a few minutes the first time)..."
  "$venv/bin/pip" install -q -e ".[test]" -c constraints.txt
  touch "$stamp"
}

setup_broker() {
  local url=${AMQP_URL:-amqp://localhost:5672}
  local hostport=${url#*://}; hostport=${hostport#*@}; hostport=${hostport%%/*}
  local host=${hostport%%:*} port=${hostport#*:}; [ "$port" = "$hostport" ] && port=5672
  if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return; fi
  case "$host" in
    localhost|127.0.0.1) ;;
    *) echo "no broker answers at $host:$port (AMQP_URL); start it there, or unset AMQP_URL" >&2; exit 1 ;;
  esac
  AMQP_PORT=$port deploy/broker.sh start
}

# mypy --strict over shared/, workers/ and bench/ as the installed package sees them (splitmq.shared,
# splitmq.workers, splitmq.bench): a tree of links under build/typecheck maps the folders to their package names.
typecheck() {
  local tree=build/typecheck
  rm -rf "$tree" && mkdir -p "$tree/splitmq"
  cp splitmq/__init__.py "$tree/splitmq/"
  ln -s ../../../shared "$tree/splitmq/shared"
  ln -s ../../../workers "$tree/splitmq/workers"
  ln -s ../../../bench "$tree/splitmq/bench"
  (cd "$tree" && MYPYPATH=. "../../$venv/bin/mypy" --strict --ignore-missing-imports --no-error-summary \
     -p splitmq.shared -p splitmq.workers -p splitmq.bench) && echo "mypy --strict: shared/, workers/ and bench/ clean"
}

cmd=${1:-}; shift || true
case "$cmd" in
  demo) setup_python; setup_broker; exec "$venv/bin/splitmq" demo "$@" ;;
  # Two test files at a time (pytest-xdist, a file's tests in one process, each process with a
  # restart node of its own: tests/conftest.py), in about 0.6 of the time; TEST_WORKERS=1: one at a time.
  test) setup_python; setup_broker; typecheck
        workers=${TEST_WORKERS:-2}
        if [ "$workers" -gt 1 ]; then set -- -n "$workers" --dist loadfile "$@"; fi
        exec "$venv/bin/python" -m pytest "$@" ;;
  typecheck) setup_python; typecheck ;;
  setup) setup_python; setup_broker ;;
  *) echo "usage: $0 demo|test|setup|typecheck [args]" >&2; exit 2 ;;
esac
