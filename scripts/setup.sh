#!/usr/bin/env bash
# Installs what snapshot-driver needs on a fresh Debian machine, then builds it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: need root (or sudo) to install Debian packages" >&2; exit 1; }
  SUDO=(sudo)
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

missing=()
command -v qemu-img >/dev/null || missing+=(qemu-utils)
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
# The agent's locks: flock(2) applied by util-linux's flock program (essential in Debian; a slim image
# may lack it).
command -v flock >/dev/null || missing+=(util-linux)
# RabbitMQ for the messaging tests (started by scripts/rabbitmq.sh, not by systemd), and the Python
# oslo.messaging that the wire-compatibility tests talk to.
command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
installed python3-oslo.messaging || missing+=(python3-oslo.messaging)
# A real Glance for the Glance image store's tests (test/helpers/glance.ts runs it from the Python
# package: python3 -m glance.cmd.api, no glance-api service), and curl for bench:export's baseline.
installed python3-glance || missing+=(python3-glance)
command -v curl >/dev/null || missing+=(curl)
# The real Linux test guest (scripts/guest-image.sh): its root filesystem is made and checked with
# e2fsprogs, its initramfs packed with cpio, its writer and probe compiled statically.
command -v mkfs.ext4 >/dev/null && command -v debugfs >/dev/null || missing+=(e2fsprogs)
command -v cpio >/dev/null || missing+=(cpio)
command -v gcc >/dev/null || missing+=(gcc)
installed libc6-dev || missing+=(libc6-dev)
# The systemd unit's test runs `systemd-analyze verify` on etc/snapshot-driver.service. The systemd
# package only provides the tools here: it does not become the init system (systemd-sysv does that).
command -v systemd-analyze >/dev/null || missing+=(systemd)
# The libvirt backend's tests: Debian 12's monolithic libvirtd, started by scripts/libvirtd.sh under
# tini (no systemd). The -sysv flavour is named so that apt does not pick the systemd one, which
# would pull systemd-container and upgrade the (unused) systemd packages.
for p in libvirt-daemon-system libvirt-daemon-system-sysv libvirt-clients libvirt-daemon-driver-qemu tini; do
  installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  # Keep the packages' maintainer scripts from starting services (no init system here):
  # scripts/rabbitmq.sh starts RabbitMQ when the tests need it.
  policy=/usr/sbin/policy-rc.d
  added_policy=false
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 755 "$policy"
    added_policy=true
  fi
  "${SUDO[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
  if [ "$added_policy" = true ]; then "${SUDO[@]}" rm -f "$policy"; fi
fi

command -v node >/dev/null || { echo "setup: Node.js 20 is required (node not found)" >&2; exit 1; }
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" -ge 20 ] || { echo "setup: Node.js >= 20 is required, found $(node --version)" >&2; exit 1; }

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
npm run --silent build
# The test guest (kernel, initramfs, ext4 root): cached, a rerun takes under a second.
bash scripts/guest-image.sh >/dev/null
