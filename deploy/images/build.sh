#!/usr/bin/env bash
# Build the Funcatron image: ./deploy/images/build.sh [TAG] [BASE]
#   TAG  default funcatron-runner:latest
#   BASE default debian:bookworm-slim (any image with the runtimes your
#        Funcs need; build one locally where no registry is reachable)
set -euo pipefail
cd "$(dirname "$0")/../.."
tag=${1:-funcatron-runner:latest}
base=${2:-debian:bookworm-slim}
cargo build --release -p funcatron
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp target/release/funcatron "$ctx/"
docker build --build-arg "BASE=$base" -f deploy/images/Dockerfile -t "$tag" "$ctx"
