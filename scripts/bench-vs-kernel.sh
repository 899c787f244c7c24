#!/usr/bin/env bash
# Benchmark twinpage against the kernel's KSM on the same workload, with the
# same tunables, in one invocation (root). Builds the release binaries (the
# qemu workload also needs libtwinpage.so and twinpaged beside twinpage),
# then runs `twinpage bench` with the given options, e.g.
#   scripts/bench-vs-kernel.sh --workload scatter --size 1G
#   scripts/bench-vs-kernel.sh --workload qemu --size 512M --out bench-out/qemu
# Writes result.json, result.md and saved.svg under --out (default ./bench-out)
# and restores the kernel's KSM settings afterwards (also on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace >&2
exec target/release/twinpage bench "$@"
