#!/usr/bin/env bash
# Install the Debian packages hangwatch needs, only when missing.
#   --build  what building needs (protoc for the containerd API bindings)
#   --test   what the test suite needs as well
# HANGWATCH_REINSTALL="pkg ..." installs those packages again even when present (the test of
# this script uses it to take the install path on a machine that has everything).
set -euo pipefail

packages=(protobuf-compiler)
if [ "${1:-}" = "--test" ]; then
  packages+=(docker.io busybox-static gcc libc6-dev prometheus prometheus-alertmanager iproute2 psmisc openssl)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# kubectl (for `kubectl kustomize`): any recent one will do; Debian's is kubernetes-client.
if [ "${1:-}" = "--test" ] && ! command -v kubectl >/dev/null; then
  missing+=(kubernetes-client)
fi
reinstall=()
read -r -a reinstall <<<"${HANGWATCH_REINSTALL:-}"
missing+=("${reinstall[@]}")

install_python_tools() {
  # Offline schema validation of the manifests (bundled schemas, no cluster needed).
  if [ "${1:-}" = "--test" ] && ! command -v kubernetes-validate >/dev/null; then
    python3 -m pip install --quiet kubernetes-validate
  fi
}

if [ ${#missing[@]} -eq 0 ]; then
  install_python_tools "${1:-}"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing packages: ${missing[*]} (run as root, or install them)" >&2
  exit 2
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Packaged services must not start during the install: the suite starts private daemons and
# the host's own services are not ours to touch. invoke-rc.d (and deb-systemd-invoke) ask
# policy-rc.d; exit 101 means "action forbidden". An existing policy is the host's: keep it.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends ${reinstall[@]:+--reinstall} "${missing[@]}" >/dev/null
install_python_tools "${1:-}"
