#!/usr/bin/env bash
# Quick start, part 1: install what is needed, then run the demo (a real Linux guest under QEMU,
# writing all along, snapshotted with every strategy into a temporary image store).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
guest_dir=$(bash scripts/guest-image.sh)
exec node dist/snapshot-driver.mjs "$@" demo --guest-dir "$guest_dir"
