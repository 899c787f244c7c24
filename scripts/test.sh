#!/usr/bin/env bash
# The whole test suite: the one command the README gives and .ci/run calls.
# It installs what it needs on a fresh Debian 12 machine (root), builds, lints
# and runs every test. Tests that need root or /dev/userfaultfd skip with a
# printed reason outside CI and fail under CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
cargo --version
rustc --version

step "build (release)"
cargo build --release --workspace --all-targets

step "clippy (warnings are errors; undocumented unsafe is denied)"
cargo clippy --release --workspace --all-targets -- -D warnings

step "prometheus-node-exporter (tests/node_exporter.rs scrapes it over loopback)"
command -v prometheus-node-exporter >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus-node-exporter; }

step "tests"
cargo test --release --workspace

if [ -x scripts/loom.sh ]; then
    step "loom models of the registry-vs-unmap and merge-vs-fault protocols"
    scripts/loom.sh
fi

step "test guest boots (TCG) and verifies its memory"
scripts/guest/smoke-test.sh
