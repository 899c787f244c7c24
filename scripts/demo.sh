#!/usr/bin/env bash
# The demo: two QEMU TCG guests run with libtwinpage.so preloaded; each fills
# memory with duplicate data, waits while twinpage merges it, rewrites part of
# it and verifies every page. Live KSM counters (from $TWINPAGE_DIR, the same
# files as /sys/kernel/mm/ksm) and the memory saved are printed as it runs.
# Installs what it needs (QEMU, the guest image). Needs root (userfaultfd).
#
#   scripts/demo.sh            two guests, 192 MiB of guest data each, under
#                              twinpaged: the guests' identical data merges
#                              across them, as kernel KSM merges between VMs
#   scripts/demo.sh --no-daemon   each QEMU merges only its own pages
#   GUEST_MIB=256 scripts/demo.sh
#   scripts/demo.sh --in-process [twinpage demo options]   no QEMU: merges
#                                                          duplicate memory of
#                                                          its own process
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --in-process ]; then
    shift
    cargo build --release --quiet --bin twinpage
    exec target/release/twinpage demo "$@"
fi

daemon=1
if [ "${1:-}" = --no-daemon ]; then daemon=0; fi
mib=${GUEST_MIB:-192}
cargo build --release --quiet --workspace
# Everything the guests need, installed once before they start side by side.
# shellcheck source=guest/lib.sh disable=SC1091
TP_LOG_NAME=demo . scripts/guest/lib.sh
tp_need qemu-system-x86_64:qemu-system-x86
scripts/guest-image.sh >/dev/null
dir=$(mktemp -d /tmp/twinpage-demo.XXXXXX)
export TWINPAGE_DIR=$dir/tree TWINPAGE_PAGES_TO_SCAN=${TWINPAGE_PAGES_TO_SCAN:-20000} TWINPAGE_SLEEP_MILLISECS=${TWINPAGE_SLEEP_MILLISECS:-20}
pids=()
guests=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -f /dev/shm/twinpage-demo-$$-*
}
trap cleanup EXIT INT TERM
if [ $daemon = 1 ]; then
    mkdir -p "$TWINPAGE_DIR"
    TWINPAGE_LOG=warn target/release/twinpaged --dir "$TWINPAGE_DIR" 2>"$dir/twinpaged.log" &
    pids+=($!)
    for _ in $(seq 50); do [ -S "$TWINPAGE_DIR/twinpaged.sock" ] && break; sleep 0.1; done
fi
for i in 1 2; do
    LD_PRELOAD=$PWD/target/release/libtwinpage.so scripts/boot-guest.sh \
        tp.mib="$mib" tp.wait=20 tp.poweroff=1 tp.seed=$((daemon ? 1 : i)) \
        -object "memory-backend-file,id=mem,size=512M,mem-path=/dev/shm/twinpage-demo-$$-$i,share=off" \
        -machine memory-backend=mem >"$dir/guest$i.log" 2>&1 &
    pids+=($!)
    guests+=($!)
done
echo "two guests booting (logs in $dir); twinpage's tree: $TWINPAGE_DIR"
ksm=$TWINPAGE_DIR/kernel/mm/ksm
pss() { awk '/^Pss:/ {print int($2/1024)}' "/proc/$1/smaps_rollup" 2>/dev/null || echo -; }
# A counter of the tree, read again when caught mid-rewrite: the publisher
# rewrites its files in place, and a read at that instant can see part of
# the old value after the new one (known; the in-process files and a FUSE
# tree would not have this).
val() {
    local v i
    for i in 1 2 3 4 5 6 7 8; do
        v=$(cat "$ksm/$1" 2>/dev/null || true)
        if [[ "$v" =~ ^[0-9]+$ ]]; then echo "$v"; return; fi
        sleep 0.02
    done
    echo 0
}
printf '%6s %12s %13s %14s %10s %14s %14s\n' time_s pages_shared pages_sharing pages_unshared saved_MiB guest1_PSS_MiB guest2_PSS_MiB
start=$SECONDS
while kill -0 "${guests[0]}" 2>/dev/null || kill -0 "${guests[1]}" 2>/dev/null; do
    if [ -r "$ksm/pages_sharing" ]; then
        sharing=$(val pages_sharing)
        printf '%6s %12s %13s %14s %10s %14s %14s\n' $((SECONDS - start)) "$(val pages_shared)" "$sharing" \
            "$(val pages_unshared)" $(( (sharing + $(val ksm_zero_pages)) * 4 / 1024 )) \
            "$(pss "${guests[0]}")" "$(pss "${guests[1]}")"
    fi
    sleep 1
done
# The guests' verdicts are in their logs once they have exited.
for g in "${guests[@]}"; do wait "$g" 2>/dev/null || true; done
ok=0
for i in 1 2; do
    verdict=$(grep -a -o 'TP-VERDICT.*' "$dir/guest$i.log" | tr -d '\r' || true)
    echo "guest $i: ${verdict:-no verdict (log: $dir/guest$i.log)}"
    if [ "$verdict" = "TP-VERDICT OK" ]; then ok=$((ok + 1)); fi
done
if [ $daemon = 1 ]; then
    echo "each guest held $((mib / 2)) MiB of duplicate data, and the same data as the other guest: under twinpaged they share it"
else
    echo "each guest held $((mib / 2)) MiB of duplicate data; without twinpaged each process merges its own pages"
fi
# The demo fails unless both guests verified their data.
[ "$ok" = 2 ] || { echo "demo: $((2 - ok)) guest(s) gave no OK verdict" >&2; exit 1; }
