#!/usr/bin/env bash
# Two guests with scattered duplicates under kernel KSM or twinpage, at a
# given vm.max_map_count: how much each saves once merging levels off
# (issue 20's measurement). Root; restores vm.max_map_count and kernel
# KSM's tunables at exit.
#
# usage: scripts/scatter-guests.sh kernel|twinpage [MAX_MAP_COUNT]
#
# Each guest: TP_MEM (default 1G) of memory-backend-file share=off RAM in
# /dev/shm, the test image's workload with tp.mib=TP_MIB (default 800)
# tp.dup=50 tp.patterns=16 (seeds 1 and 2), merging flat out
# (pages_to_scan=100000 sleep_millisecs=0). Twinpage's side runs its guests
# preloaded under a twinpaged that keeps the host's vm.max_map_count
# (TP_RAISE=1: one that raises it, as twinpaged does by default as root).
#
# Prints a line every 5 s (saved pages, held-back pages, QEMU mappings) and
# at the end one result line:
#   RESULT side=S max_map_count=N saved=P held_back=H maps=M1,M2 secs=T
# saved = pages_sharing + ksm_zero_pages. The run ends when the guests have
# filled their buffers and the saving has not grown by 0.2% for 30 s, or
# after TP_SECS (default 420).
set -euo pipefail

side=${1:?usage: scatter-guests.sh kernel|twinpage [MAX_MAP_COUNT]}
case "$side" in kernel | twinpage) ;; *)
    echo "scatter-guests.sh: side must be kernel or twinpage, not '$side'" >&2
    exit 2
    ;;
esac
want_maps=${2:-}
[ -z "$want_maps" ] || [[ "$want_maps" =~ ^[0-9]+$ ]] || {
    echo "scatter-guests.sh: MAX_MAP_COUNT must be a number, not '$want_maps'" >&2
    exit 2
}
[ "$(id -u)" = 0 ] || { echo "scatter-guests.sh: needs root (vm.max_map_count, kernel KSM)" >&2; exit 2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
mem=${TP_MEM:-1G}
mib=${TP_MIB:-800}
secs=${TP_SECS:-420}
bin=${TP_BIN:-$repo/target/release}
ksm=/sys/kernel/mm/ksm

work=$(mktemp -d /tmp/scatter-guests.XXXXXX)
old_maps=$(cat /proc/sys/vm/max_map_count)
declare -A old_ksm=()
for a in run pages_to_scan sleep_millisecs; do old_ksm[$a]=$(cat "$ksm/$a"); done
pids=()
daemon=

cleanup() {
    set +e
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
    if [ -n "$daemon" ]; then kill "$daemon" 2>/dev/null; wait "$daemon" 2>/dev/null; fi
    if [ "$side" = kernel ]; then
        echo 2 >"$ksm/run"
        for a in pages_to_scan sleep_millisecs run; do echo "${old_ksm[$a]}" >"$ksm/$a"; done
    fi
    echo "$old_maps" >/proc/sys/vm/max_map_count
    rm -f /dev/shm/tp-scatter-"$$"-*
    [ -n "${TP_KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ -z "$want_maps" ] || echo "$want_maps" >/proc/sys/vm/max_map_count
echo "side $side, vm.max_map_count $(cat /proc/sys/vm/max_map_count), two guests of $mem, $mib MiB of data each (work dir $work)"

env_twinpage=()
if [ "$side" = kernel ]; then
    echo 2 >"$ksm/run"
    echo 100000 >"$ksm/pages_to_scan"
    echo 0 >"$ksm/sleep_millisecs"
    echo 1 >"$ksm/run"
    attrs=$ksm
else
    [ "$(cat "$ksm/run")" != 1 ] || { echo "scatter-guests.sh: kernel KSM is running (run=1); stop it first" >&2; exit 2; }
    tree=$work/tree
    keep=(--keep-max-map-count)
    [ -z "${TP_RAISE:-}" ] || keep=()
    TWINPAGE_LOG=info "$bin/twinpaged" --dir "$tree" "${keep[@]}" 2>"$work/twinpaged.log" &
    daemon=$!
    for _ in $(seq 100); do [ -e "$tree/kernel/mm/ksm/run" ] && break; sleep 0.1; done
    "$bin/twinpage" set --dir "$tree" pages_to_scan 100000
    "$bin/twinpage" set --dir "$tree" sleep_millisecs 0
    attrs=$tree/kernel/mm/ksm
    env_twinpage=(LD_PRELOAD="$bin/libtwinpage.so" TWINPAGE_DIR="$tree"
        TWINPAGE_PAGES_TO_SCAN=100000 TWINPAGE_SLEEP_MILLISECS=0)
fi

for seed in 1 2; do
    env "${env_twinpage[@]}" "$here/boot-guest.sh" tp.mib="$mib" tp.dup=50 tp.patterns=16 tp.seed="$seed" \
        tp.wait=100000 tp.rewrite=0 \
        -m "$mem" -object "memory-backend-file,id=mem,size=$mem,mem-path=/dev/shm/tp-scatter-$$-$seed,share=off" \
        -machine memory-backend=mem </dev/null >"$work/guest-$seed.log" 2>&1 &
    pids+=($!)
done

read_attr() { cat "$attrs/$1" 2>/dev/null || echo 0; }
saved() { echo $(($(read_attr pages_sharing) + $(read_attr ksm_zero_pages))); }
held() {
    [ "$side" = twinpage ] || { echo 0; return; }
    "$bin/twinpage" stat --dir "$tree" --json 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["twinpage"].get("twinpage_pages_held_back", 0))' 2>/dev/null || echo 0
}
maps() {
    local out=()
    for p in "${pids[@]}"; do out+=("$(wc -l <"/proc/$p/maps" 2>/dev/null || echo 0)"); done
    (IFS=,; echo "${out[*]}")
}

start=$(date +%s)
best=0
best_at=$start
ready=0
while :; do
    sleep 5
    now=$(date +%s)
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || { echo "a guest exited; logs in $work" >&2; tail -5 "$work"/guest-*.log >&2; trap - EXIT; exit 1; }; done
    ready=$(cat "$work"/guest-*.log | grep -c 'TP-READY' || true)
    s=$(saved)
    echo "  $((now - start)) s: saved $s pages, held back $(held), mappings $(maps), guests filled $ready/2"
    if [ "$s" -gt $((best + best / 500)) ]; then best=$s; best_at=$now; fi
    if [ "$ready" = 2 ] && [ $((now - best_at)) -ge 30 ]; then break; fi
    [ $((now - start)) -lt "$secs" ] || { echo "  timeout after $secs s"; break; }
done
echo "RESULT side=$side max_map_count=$(cat /proc/sys/vm/max_map_count) saved=$(saved) held_back=$(held) maps=$(maps) secs=$(($(date +%s) - start))"
