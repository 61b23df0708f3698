#!/usr/bin/env bash
# The whole test suite. Installs and starts what the tests need on a fresh
# Debian machine (RabbitMQ from Debian's packages), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "== installing RabbitMQ from Debian's packages"
  as_root apt-get update -qq
  # policy-rc.d may forbid starting services at install time; we start it below.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi

if ! as_root rabbitmqctl await_startup --timeout 5 >/dev/null 2>&1; then
  echo "== starting RabbitMQ"
  as_root rabbitmq-server -detached
  # Wait for readiness: the node first has to exist before await_startup can wait on it.
  for _ in $(seq 1 120); do
    as_root rabbitmqctl await_startup --timeout 10 >/dev/null 2>&1 && break
    sleep 0.5
  done
  as_root rabbitmqctl await_startup --timeout 10 >/dev/null
fi
echo "== RabbitMQ is up"

# One build, every test (the broker-restart test is its own binary, and cargo
# runs test binaries one after another, so it never disturbs the others).
cargo test --workspace --all-targets "$@"
