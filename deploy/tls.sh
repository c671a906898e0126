#!/usr/bin/env bash
# TLS material and broker settings for splitmq (openssl only; see docs/security.md).
# Usage:
#   deploy/tls.sh make DIR [CLIENT ...]   a CA, a server certificate and client certificates in DIR
#                                         (default client: "client"); existing files are kept
#   deploy/tls.sh conf DIR                rabbitmq.conf lines for a TLS listener using DIR
# Environment:
#   TLS_PORT (5671)                       the TLS listener's port
#   TLS_SERVER_NAMES ("")                 extra subjectAltNames for the server, e.g. "DNS:broker.example.org,IP:10.0.0.5"
#                                         (localhost and 127.0.0.1 are always in)
#   TLS_FAIL_IF_NO_PEER_CERT (false)      true: every client must present a certificate signed by the CA
#   TLS_DAYS (825)                        validity of server and client certificates
#   TLS_ONLY (false)                      true: switch the plain TCP listener off (conf)
# Files: ca.pem ca.key server.pem server.key client-NAME.pem client-NAME.key (client.pem/.key
# for the default client). Keys are 0600; the server key is group-readable by rabbitmq,
# which the broker runs as. The CA key signs certificates only: keep it off the broker in production.
set -euo pipefail

days=${TLS_DAYS:-825}

make_ca() {
  [ -s "$dir/ca.pem" ] && return
  (umask 077; openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 -subj "/CN=splitmq CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null)
}

# sign NAME CN EXTENSIONS: NAME.key + NAME.pem, signed by the CA.
sign() {
  local name=$1 cn=$2 ext=$3
  [ -s "$dir/$name.pem" ] && return
  (umask 077; openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=$cn" \
    -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null)
  printf '%b' "$ext" > "$dir/$name.ext"
  openssl x509 -req -sha256 -days "$days" -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAserial "$dir/ca.srl" -CAcreateserial -extfile "$dir/$name.ext" -out "$dir/$name.pem" 2>/dev/null
  rm -f "$dir/$name.csr" "$dir/$name.ext"
}

common_ext='basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n'

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_openssl() {
  command -v openssl >/dev/null && return
  echo "installing openssl (Debian package)..." >&2
  as_root apt-get update -q >/dev/null
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl >/dev/null
}

make() {
  need_openssl
  mkdir -p "$dir"
  chmod 755 "$dir"  # the broker (user rabbitmq) reads the server files from here
  make_ca
  local sans="DNS:localhost,IP:127.0.0.1${TLS_SERVER_NAMES:+,$TLS_SERVER_NAMES}"
  sign server localhost "${common_ext}keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=$sans\n"
  if getent group rabbitmq >/dev/null; then  # a broker on this host runs as user rabbitmq: it must read the key
    if as_root chgrp rabbitmq "$dir/server.key" 2>/dev/null; then
      chmod 640 "$dir/server.key"
    else
      echo "warning: could not give $dir/server.key to group rabbitmq (run as root or with sudo): a broker on this host cannot read it" >&2
    fi
  fi
  local clients=("$@"); [ ${#clients[@]} -gt 0 ] || clients=(client)
  for c in "${clients[@]}"; do
    local file="client-$c"; [ "$c" = client ] && file=client
    sign "$file" "$c" "${common_ext}keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
  done
  chmod 644 "$dir"/*.pem
  echo "TLS files in $dir: ca.pem, server.pem/.key, client certificate(s): ${clients[*]}" >&2
}

conf() {
  for f in ca.pem server.pem server.key; do
    [ -s "$dir/$f" ] || { echo "missing $dir/$f: run $0 make $dir first" >&2; exit 1; }
  done
  cat <<EOF
# TLS listener (deploy/tls.sh conf): clients verify the broker against ca.pem; the broker
# verifies any client certificate against it too.
listeners.ssl.default = ${TLS_PORT:-5671}
ssl_options.cacertfile = $dir/ca.pem
ssl_options.certfile = $dir/server.pem
ssl_options.keyfile = $dir/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = ${TLS_FAIL_IF_NO_PEER_CERT:-false}
EOF
  if [ "${TLS_ONLY:-false}" = true ]; then
    printf '# TLS only: no plain AMQP listener (overrides listeners.tcp.default above)\nlisteners.tcp = none\n'
  fi
}

cmd=${1:-}; [ $# -ge 2 ] || { echo "usage: $0 make DIR [CLIENT ...] | conf DIR" >&2; exit 2; }
if [ "$cmd" = make ]; then mkdir -p "$2"; fi
dir=$(cd "$2" && pwd); shift 2
case "$cmd" in
  make) make "$@" ;;
  conf) conf ;;
  *) echo "usage: $0 make DIR [CLIENT ...] | conf DIR" >&2; exit 2 ;;
esac
