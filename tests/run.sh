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

step "pure tests as an unprivileged user (tier 1: no root, no daemons)"
# The unit tests and the tree's own checks need nothing of the machine: prove it by running
# them as nobody, from a copy nobody may read.
tier1=$(mktemp -d)
trap 'rm -rf "$tier1"' EXIT
cargo test --lib --test architecture --test fake_source --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' |
  while read -r exe; do cp "$exe" "$tier1/"; done
chmod -R a+rX "$tier1"
for exe in "$tier1"/*; do
  (cd "$tier1" && runuser -u nobody -- "$exe" -q)
done

step "cargo test (tier 2: real daemons, kernel, cgroups)"
# Each integration test starts its own private daemons; two at a time fits a 2-core machine.
cargo test -- --test-threads="${HANGWATCH_TEST_THREADS:-2}"

step "all checks passed"
