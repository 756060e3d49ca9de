#!/usr/bin/env bash
# Build and run the hangwatch daemon with the built-in defaults (no config file needed).
# Extra arguments go to `hangwatch run`, e.g. --config FILE or --listen 127.0.0.1:9807.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --build
exec cargo run --release -- run "$@"
