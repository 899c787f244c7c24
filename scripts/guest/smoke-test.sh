#!/usr/bin/env bash
# Smoke test of the test guest: boots it three ways under TCG and checks the
# console for TP-READY and TP-VERDICT OK (and TP-BALLOON present with a
# balloon). Prints the wall-clock seconds from QEMU start to each line.
#
# usage: scripts/guest/smoke-test.sh        (exit 0 when all boots pass)
# environment: TP_SMOKE_TIMEOUT seconds per boot (default 120)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
boot=$here/../boot-guest.sh
timeout_s=${TP_SMOKE_TIMEOUT:-120}
shm=/dev/shm/tp-smoke-$$
trap 'rm -f "$shm"' EXIT

"$here/../guest-image.sh" # build (or find cached) before timing boots

fails=0
# run NAME EXPECT... -- BOOT-ARGS...
run() {
    local name=$1 want=() a log t0 ok=1
    shift
    while [ "$1" != -- ]; do want+=("$1"); shift; done
    shift
    log=$(mktemp)
    t0=$(date +%s.%N)
    timeout "$timeout_s" "$boot" tp.mib=64 tp.wait=3 tp.poweroff=1 "$@" 2>"$log.err" </dev/null |
        while IFS= read -r line; do
            line=${line%$'\r'}
            printf '%6.2f %s\n' "$(awk "BEGIN{print $(date +%s.%N) - $t0}")" "$line"
        done >"$log" || true
    for a in "${want[@]}"; do
        grep -q -- " $a" "$log" || { ok=0; echo "[$name] missing: $a"; }
    done
    if [ "$ok" = 1 ]; then
        echo "[$name] PASS ($(awk '/ TP-READY/{print "ready " $1 "s"}' "$log"), total $(tail -n1 "$log" | awk '{print $1}')s)"
    else
        fails=$((fails + 1))
        echo "[$name] FAIL; console:"; sed 's/^/    /' "$log"; sed 's/^/    err: /' "$log.err"
    fi
    rm -f "$log" "$log.err"
}

run plain "TP-READY pages=16384 dup_pages=8192" "TP-VERDICT OK" --
run memfile "TP-READY" "TP-VERDICT OK" -- \
    -object "memory-backend-file,id=mem,size=512M,mem-path=$shm,share=off" \
    -machine memory-backend=mem
rm -f "$shm"
run balloon "TP-BALLOON present" "TP-READY" "TP-VERDICT OK" -- -device virtio-balloon

echo "$((3 - fails)) passed, $fails failed"
[ "$fails" = 0 ]
