#!/usr/bin/env bash
# Installs the Debian packages the agent and its tests need. Idempotent: only
# missing packages are installed.
set -euo pipefail

packages=(
  docker.io docker-compose busybox-static
  libvirt-dev libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  qemu-system-x86 qemu-utils genisoimage protobuf-compiler pkg-config
  iproute2 procps openssl
  # tests/registry.rs: a private registry (distribution 2.8) with htpasswd auth.
  docker-registry apache2-utils
  # tests/import.rs: the Go agent's state.db, written by the real bbolt.
  golang-go golang-github-coreos-bbolt-dev
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "hack/deps.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Installing qemu-system-x86 can replace a backported qemu-utils.
if ! command -v qemu-img >/dev/null; then
  apt-get install -y -qq --reinstall qemu-utils >/dev/null
fi

# The power-loss test mounts a FUSE filesystem in-process (pure Rust, no
# libfuse): it needs the kernel's fuse module and /dev/fuse.
if [[ ! -e /dev/fuse ]]; then
  modprobe fuse || echo "hack/deps.sh: /dev/fuse missing and modprobe fuse failed" >&2
fi
