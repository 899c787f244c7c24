#!/usr/bin/env bash
# The demo: builds twinpage and merges duplicate memory in-process, printing
# the KSM-shaped counters and the memory saved (PSS from smaps_rollup).
# Needs root (or access to /dev/userfaultfd). Extra arguments go to
# `twinpage demo` (see `twinpage demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin twinpage
exec target/release/twinpage demo "$@"
