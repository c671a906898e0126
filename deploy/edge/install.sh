#!/usr/bin/env bash
# Install a splitmq edge worker on a Debian-based device (Raspberry Pi OS, Debian, Ubuntu; arm64
# or amd64) as a systemd service. Run as root from a checkout of the repository:
#   sudo deploy/edge/install.sh --client client-0
# then edit /etc/splitmq/client-0.env and start it:
#   sudo systemctl enable --now splitmq-worker@client-0
# It installs: a system user `splitmq`; a virtualenv in $PREFIX/venv with CPU-only torch (no CUDA
# wheels: hundreds of MB less) and this project; the unit template splitmq-worker@.service;
# /etc/splitmq/<client>.env from worker.env.example (never overwritten). Running it again
# upgrades the project in the venv and keeps the environment files.
# Options: --client ID (repeatable), --no-python (skip the venv: units and files only).
# Environment: PREFIX (/opt/splitmq); ROOT (install under this directory instead of /, for
# building an image or testing; user creation and systemctl are skipped then).
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
ROOT=${ROOT:-}
PREFIX=${PREFIX:-/opt/splitmq}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
clients=() python=1

while [ $# -gt 0 ]; do
  case "$1" in
    --client) clients+=("$2"); shift 2 ;;
    --no-python) python=0; shift ;;
    *) echo "usage: $0 [--client ID]... [--no-python]" >&2; exit 2 ;;
  esac
done
for c in "${clients[@]}"; do
  [[ "$c" =~ ^[A-Za-z0-9_-]{1,64}$ ]] || { echo "client id $c must be 1-64 of [A-Za-z0-9_-]" >&2; exit 2; }
done
if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then echo "run as root (sudo $0 ...)" >&2; exit 1; fi

pin() {  # the version pyproject.toml pins for package $1
  sed -n "s/^ *\"$1==\([^\"]*\)\".*/\1/p" "$src/pyproject.toml" | head -1
}

install_user() {
  [ -n "$ROOT" ] && return
  id splitmq >/dev/null 2>&1 || useradd --system --home-dir /var/lib/splitmq --no-create-home \
    --shell /usr/sbin/nologin splitmq
}

install_python() {
  local venv="$ROOT$PREFIX/venv"
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv python3-pip >/dev/null
  fi
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  # CPU-only wheels first (the PyPI default for x86_64 pulls CUDA libraries); the project's
  # own install then finds the pinned versions already satisfied.
  echo "installing torch $(pin torch) (CPU only) into $venv; this takes a while on a small board..."
  "$venv/bin/pip" install -q --index-url "$TORCH_INDEX" "torch==$(pin torch)" "torchvision==$(pin torchvision)"
  echo "installing splitmq from $src..."
  "$venv/bin/pip" install -q "$src"
}

install_files() {
  install -d -m 0755 "$ROOT/etc/systemd/system" "$ROOT$PREFIX/docs"
  install -m 0644 "$src/deploy/edge/splitmq-worker@.service" "$ROOT/etc/systemd/system/splitmq-worker@.service"
  install -m 0644 "$src/docs/edge.md" "$ROOT$PREFIX/docs/edge.md"
  install -d -m 0750 "$ROOT/etc/splitmq"
  install -m 0644 "$src/deploy/edge/worker.env.example" "$ROOT/etc/splitmq/worker.env.example"
  local c env
  for c in "${clients[@]}"; do
    env="$ROOT/etc/splitmq/$c.env"
    if [ -e "$env" ]; then echo "keeping $env"; continue; fi
    # The example is for client-0; fill in this client's id where the example has it.
    sed -e "s/client-0/$c/g" "$src/deploy/edge/worker.env.example" >"$env"
    chmod 0640 "$env"
    echo "wrote $env: set AMQP_URL, SPLITMQ_CLIENT_INDEX and the job settings"
  done
  if [ -z "$ROOT" ]; then chown -R root:splitmq /etc/splitmq; fi
}

reload_systemd() {
  [ -z "$ROOT" ] && [ -d /run/systemd/system ] || return 0
  systemctl daemon-reload
}

install_user
[ "$python" = 1 ] && install_python
install_files
reload_systemd
echo "installed. Start a worker with: systemctl enable --now splitmq-worker@<client id>"
