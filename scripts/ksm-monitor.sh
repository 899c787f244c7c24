#!/usr/bin/env bash
# The usual KSM monitoring loop: one line per interval with the time,
# pages_shared, pages_sharing, pages_unshared and the memory saved
# ((pages_sharing + ksm_zero_pages) x page size), read from
# ROOT/kernel/mm/ksm. The same script works on the kernel and on twinpage:
#
#   scripts/ksm-monitor.sh /sys                 # kernel KSM
#   scripts/ksm-monitor.sh "$TWINPAGE_DIR" 0.5  # twinpage's tree
#
# Usage: ksm-monitor.sh ROOT [INTERVAL_SECONDS [COUNT]]
# COUNT lines are printed (0, the default, means until interrupted).
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 3 ]; then
    echo "usage: $0 ROOT [INTERVAL_SECONDS [COUNT]]  (ROOT: /sys, or \$TWINPAGE_DIR)" >&2
    exit 2
fi
root=${1%/}
interval=${2:-1}
count=${3:-0}
dir=$root/kernel/mm/ksm
if [ ! -r "$dir/pages_sharing" ]; then
    echo "$0: no KSM attributes under $dir" >&2
    exit 1
fi
page_size=$(getconf PAGESIZE 2>/dev/null || echo 4096)

# A missing attribute (ksm_zero_pages before Linux 6.1) reads as 0.
read_attr() {
    local v
    v=$(cat "$dir/$1" 2>/dev/null) || v=0
    printf '%s' "${v:-0}"
}

printf '%-8s %14s %14s %14s %12s\n' time pages_shared pages_sharing pages_unshared saved_MiB
n=0
while :; do
    shared=$(read_attr pages_shared)
    sharing=$(read_attr pages_sharing)
    unshared=$(read_attr pages_unshared)
    zero=$(read_attr ksm_zero_pages)
    saved=$(awk -v s="$sharing" -v z="$zero" -v p="$page_size" 'BEGIN { printf "%.1f", (s + z) * p / 1048576 }')
    printf '%-8s %14s %14s %14s %12s\n' "$(date +%T)" "$shared" "$sharing" "$unshared" "$saved"
    n=$((n + 1))
    if [ "$count" -gt 0 ] && [ "$n" -ge "$count" ]; then
        break
    fi
    sleep "$interval"
done
