#!/usr/bin/env bash
# Quick start, part 2: install what is needed, then run the whole test suite (unit tests on the fake
# hypervisor, integration tests on real qemu-img and real QEMU guests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
npx tsc --noEmit -p .
exec npx vitest run "$@"
