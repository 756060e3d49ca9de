#!/usr/bin/env bash
# Build the static hangwatch binary and the FROM-scratch image.
#   scripts/build-image.sh [TAG]            (default hangwatch:<crate version>)
# DOCKER (default: docker) and DOCKER_HOST select the engine that builds it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --build
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
tag=${1:-hangwatch:$version}
# glibc linked statically: the image has no libc. hangwatch resolves no host names (it dials
# unix sockets; the cordoner reaches the API server by the IP in KUBERNETES_SERVICE_HOST).
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu
"${DOCKER:-docker}" build -t "$tag" .
echo "built $tag"
