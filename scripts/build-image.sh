#!/usr/bin/env bash
# Build the static binaries and the FROM-scratch images: hangwatch (the DaemonSet) and
# hangwatch-cordoner (its own image, so the node's carries no Kubernetes client).
#   scripts/build-image.sh [VERSION]        (default: the crate version)
# DOCKER (default: docker) and DOCKER_HOST select the engine that builds it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --build
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
tag=${1:-$version}
# glibc linked statically: the image has no libc. hangwatch resolves no host names (it dials
# unix sockets; the cordoner reaches the API server by the IP in KUBERNETES_SERVICE_HOST).
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu
"${DOCKER:-docker}" build --target hangwatch -t "hangwatch:$tag" .
"${DOCKER:-docker}" build --target cordoner -t "hangwatch-cordoner:$tag" .
echo "built hangwatch:$tag and hangwatch-cordoner:$tag"
