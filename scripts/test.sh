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

step "rustfmt (the tree is formatted)"
cargo fmt --all -- --check

step "clippy (warnings are errors; undocumented unsafe is denied; no API newer than the declared rust-version)"
cargo clippy --release --workspace --all-targets -- -D warnings

step "rustdoc (no warnings: broken links, private links, stray HTML)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace

step "prerequisites: QEMU, gcc, the test guest image, prometheus-node-exporter, the kernel's ksm_tests"
# shellcheck source=guest/lib.sh disable=SC1091
. scripts/guest/lib.sh
tp_need qemu-system-x86_64:qemu-system-x86 gcc:gcc prometheus-node-exporter:prometheus-node-exporter
scripts/guest-image.sh
scripts/kselftest.sh

step "tests"
cargo test --release --workspace

if [ -x scripts/loom.sh ]; then
    step "loom models of the registry-vs-unmap and merge-vs-fault protocols"
    scripts/loom.sh
fi

step "test guest boots (TCG) and verifies its memory"
scripts/guest/smoke-test.sh

step "libvirt: a domain whose QEMU preloads twinpage merges through twinpaged (QEMU as libvirt-qemu, then as root)"
scripts/libvirt-recipe.sh user
scripts/libvirt-recipe.sh root

step "the demo, end to end: two guests under twinpaged, both verdicts OK"
GUEST_MIB=64 scripts/demo.sh
