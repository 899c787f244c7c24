#!/bin/sh
# Loom models of the registry/munmap and merge/fault protocols (tests/loom.rs).
# Built in its own target dir: --cfg loom would otherwise rebuild everything
# in target/. Extra arguments go to the test binary (e.g. a test name).
set -eu
cd "$(dirname "$0")/.."
RUSTFLAGS="${RUSTFLAGS:-} --cfg loom" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/loom}" \
    exec cargo test --release --test loom -- "$@"
