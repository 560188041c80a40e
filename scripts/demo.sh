#!/usr/bin/env bash
# Quick start, part 1: install what is needed, then run the demo (a real QEMU guest snapshotted with
# every strategy into a temporary image store).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec node dist/cli/main.js "$@" demo
