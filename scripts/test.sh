#!/usr/bin/env bash
# The whole test suite. Installs and starts what the tests need on a fresh
# Debian machine (RabbitMQ, PostgreSQL for the state store, nginx with the
# Lua module, lua-cjson, and the Func runtimes python3 + venv, Node.js, a
# JDK, bubblewrap for Func isolation, all from Debian's packages,
# and a Docker engine for the docker/swarm substrate tests), then runs every
# test.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# Each stage prints how long it took, so a slow CI run shows where time went.
stage_start=$SECONDS
stage() { echo "== stage '$1' took $((SECONDS - stage_start)) s"; stage_start=$SECONDS; }

need=()
command -v rabbitmq-server >/dev/null 2>&1 || need+=(rabbitmq-server)
{ compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null && command -v pg_ctlcluster >/dev/null 2>&1; } \
  || need+=(postgresql)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
[ -f /usr/lib/nginx/modules/ngx_http_lua_module.so ] || need+=(libnginx-mod-http-lua)
[ -f /usr/lib/x86_64-linux-gnu/lua/5.1/cjson.so ] || dpkg -s lua-cjson >/dev/null 2>&1 || need+=(lua-cjson)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v javac >/dev/null 2>&1 || need+=(default-jdk-headless)
command -v prlimit >/dev/null 2>&1 || need+=(util-linux)
command -v pgrep >/dev/null 2>&1 || need+=(procps)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
command -v docker >/dev/null 2>&1 || need+=(docker.io)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]} from Debian's packages"
  as_root apt-get update -qq
  # Services are started by this script, not at install time.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
stage install

# A CA and a server certificate for RabbitMQ's TLS listener (port 5671),
# made here, so the amqps tests check a certificate chain they control.
tls_dir=${FUNCATRON_TEST_TLS_DIR:-/var/tmp/funcatron-test-tls}
export FUNCATRON_TEST_TLS_DIR=$tls_dir
if [ ! -f "$tls_dir/server.pem" ]; then
  echo "== making test TLS certificates in $tls_dir"
  mkdir -p "$tls_dir"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=funcatron test CA" \
    -keyout "$tls_dir/ca.key" -out "$tls_dir/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$tls_dir/server.key" -out "$tls_dir/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$tls_dir/san.ext"
  openssl x509 -req -in "$tls_dir/server.csr" -CA "$tls_dir/ca.pem" -CAkey "$tls_dir/ca.key" \
    -CAcreateserial -days 3650 -extfile "$tls_dir/san.ext" -out "$tls_dir/server.pem" 2>/dev/null
  chmod 644 "$tls_dir"/*.pem "$tls_dir"/*.key
fi
cat > "$tls_dir/rabbitmq.conf" <<CONF
listeners.tcp.default = 5672
listeners.ssl.default = 5671
ssl_options.cacertfile = $tls_dir/ca.pem
ssl_options.certfile = $tls_dir/server.pem
ssl_options.keyfile = $tls_dir/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
CONF
# A RabbitMQ already running without the TLS listener is restarted with it.
if as_root rabbitmqctl await_startup --timeout 5 >/dev/null 2>&1 \
  && ! as_root rabbitmq-diagnostics -q listeners 2>/dev/null | grep -q 5671; then
  echo "== restarting RabbitMQ with its TLS listener"
  as_root rabbitmqctl stop >/dev/null
fi
if ! as_root rabbitmqctl await_startup --timeout 5 >/dev/null 2>&1; then
  echo "== starting RabbitMQ"
  as_root env RABBITMQ_CONFIG_FILE="$tls_dir/rabbitmq.conf" rabbitmq-server -detached
  # Wait for readiness: the node first has to exist before await_startup can wait on it.
  for _ in $(seq 1 120); do
    as_root rabbitmqctl await_startup --timeout 10 >/dev/null 2>&1 && break
    sleep 0.5
  done
  as_root rabbitmqctl await_startup --timeout 10 >/dev/null
fi
echo "== RabbitMQ is up"
stage rabbitmq

# PostgreSQL for the state store's shared adapter (store/tests/postgres.rs):
# Debian's first cluster, started here, with a role and a database for the
# tests. A FUNCATRON_TEST_POSTGRES given by the caller names a server of its
# own, and this stage leaves the local one alone.
as_postgres() { (cd / && if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi); }
if [ -z "${FUNCATRON_TEST_POSTGRES:-}" ]; then
  if ! pg_lsclusters -h | grep -q .; then
    echo "== creating a PostgreSQL cluster"
    as_root pg_createcluster "$(ls /usr/lib/postgresql | sort -V | tail -1)" main >/dev/null
  fi
  read -r pg_version pg_cluster pg_port pg_status _ < <(pg_lsclusters -h | head -1)
  if [ "$pg_status" != online ]; then
    echo "== starting PostgreSQL $pg_version/$pg_cluster on port $pg_port"
    as_root pg_ctlcluster "$pg_version" "$pg_cluster" start
  fi
  for _ in $(seq 1 120); do
    pg_isready -q -h 127.0.0.1 -p "$pg_port" && break
    sleep 0.5
  done
  pg_isready -q -h 127.0.0.1 -p "$pg_port"
  as_postgres psql -q -p "$pg_port" -v ON_ERROR_STOP=1 <<'SQL'
SELECT 'CREATE ROLE funcatron LOGIN PASSWORD ''funcatron'''
  WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'funcatron') \gexec
SELECT 'CREATE DATABASE funcatron_test OWNER funcatron'
  WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'funcatron_test') \gexec
SQL
  export FUNCATRON_TEST_POSTGRES="postgres://funcatron:funcatron@127.0.0.1:$pg_port/funcatron_test"
fi
echo "== PostgreSQL is up"
stage postgres

if ! docker info >/dev/null 2>&1; then
  echo "== starting the Docker engine"
  as_root sh -c 'dockerd >/var/log/dockerd.log 2>&1 &'
  for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null
fi
echo "== Docker is up"
stage docker

# One build, every test (the broker-restart test is its own binary, and cargo
# runs test binaries one after another, so it never disturbs the others).
cargo test --workspace --all-targets "$@"
stage "build and test"
