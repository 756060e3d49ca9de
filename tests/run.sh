#!/usr/bin/env bash
# The whole hangwatch test suite, on a fresh Debian machine, as root.
#
# Installs what the suite needs when it is missing (docker.io for real dockerd + containerd +
# runc, protoc for the containerd API, busybox-static for test images, gcc for static test
# helpers, Prometheus + Alertmanager + promtool), then runs the format and lint checks and
# every test. The integration tests start their own private dockerd/containerd instances
# (own sockets and roots under /tmp) and never touch the machine's Docker.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "tests/run.sh: run as root (the tests use real cgroups, /dev/kmsg and private daemons)" >&2
  exit 2
fi

scripts/install-deps.sh --test

export PATH="$HOME/.cargo/bin:$PATH"
step() { printf '\n=== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -D warnings"
cargo clippy --all-targets -- -D warnings

step "static release binary (the image test runs it in a FROM-scratch image)"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu

step "cargo test"
# Each integration test starts its own private daemons; two at a time fits a 2-core machine.
cargo test -- --test-threads="${HANGWATCH_TEST_THREADS:-2}"

step "all checks passed"
