#!/usr/bin/env bash
# Soak: TCG test guests (scripts/boot-guest.sh) boot, churn memory and exit
# under twinpaged, a few at a time, for --duration; every --interval seconds
# the daemon's counters, MemAvailable and twinpaged's fds, mappings and RSS
# are sampled into a CSV. At the end (all guests gone) it checks: every
# guest's verdict OK (killed guests: no bad page before the kill), store and
# agents back to 0, twinpaged's fds and mappings back to their baseline, its
# RSS and the host's MemAvailable back near baseline. Not part of CI.
#
# usage: scripts/soak.sh [--duration 30m] [--guests 3] [--mem 192M] [--mib 32]
#                        [--interval 3] [--kill-every 4] [--out DIR] [--no-build]
#   --duration    how long guests are started (s, m or h suffix; default 30m)
#   --guests      guests running at once (default 3)
#   --mem         each guest's RAM (default 192M); --mib its data buffer
#   --kill-every  every Nth guest is killed with SIGKILL mid-run (0: none)
#   --out         output directory (default target/soak-<date>): soak.csv,
#                 summary.txt, soak.svg, twinpaged.log, guests/<n>.log
# Exit status 0 when every check passed, 1 otherwise. Needs root (userfaultfd).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
cmdline="scripts/soak.sh $*"

duration=30m guests=3 mem=192M mib=32 interval=3 kill_every=4 out="" build=1
while [ $# -gt 0 ]; do
    case "$1" in
    --duration) duration=$2; shift 2 ;;
    --guests) guests=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --mib) mib=$2; shift 2 ;;
    --interval) interval=$2; shift 2 ;;
    --kill-every) kill_every=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "soak: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$duration" in
*h) secs=$((${duration%h} * 3600)) ;;
*m) secs=$((${duration%m} * 60)) ;;
*s) secs=${duration%s} ;;
*) secs=$duration ;;
esac
for v in secs guests mib interval kill_every; do
    [[ ${!v} =~ ^[0-9]+$ ]] || { echo "soak: --${v/secs/duration} must be a number" >&2; exit 2; }
done
[ "$(id -u)" -eq 0 ] || { echo "soak: needs root (userfaultfd)" >&2; exit 2; }

out=${out:-$repo/target/soak-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out/guests"
out=$(cd "$out" && pwd)
tree=$out/tree
lib=$repo/target/release/libtwinpage.so
if [ "$build" = 1 ]; then
    (cd "$repo" && cargo build --release --workspace -q)
fi
"$repo/scripts/guest-image.sh" >/dev/null

log() { printf 'soak: %s\n' "$*" >&2; }

daemon_pid=""
declare -A gpid=() # guest number -> QEMU pid
declare -A gkill=() # guest number -> time to SIGKILL it
cleanup() {
    for n in "${!gpid[@]}"; do kill -9 "${gpid[$n]}" 2>/dev/null || true; done
    [ -z "$daemon_pid" ] || kill "$daemon_pid" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

TWINPAGE_LOG=info "$repo/target/release/twinpaged" --dir "$tree" >/dev/null 2>"$out/twinpaged.log" &
daemon_pid=$!
for _ in $(seq 100); do [ -S "$tree/twinpaged.sock" ] && break; sleep 0.1; done
[ -S "$tree/twinpaged.sock" ] || { log "twinpaged did not start"; cat "$out/twinpaged.log" >&2; exit 1; }
sleep 1

counter() { # NAME: the daemon's counter
    awk -v n="$1" '$1 == n { print $2; f = 1 } END { if (!f) print 0 }' "$tree/proc/$daemon_pid/twinpage_counters" 2>/dev/null || echo 0
}
memavail() { awk '/^MemAvailable:/ { print $2 }' /proc/meminfo; }
nfds() { find "/proc/$daemon_pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
nmaps() { wc -l <"/proc/$daemon_pid/maps"; }
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $s != Z* ]]; }
rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$daemon_pid/status"; }

start=$(date +%s.%N)
now() { awk -v s="$start" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }'; }
csv=$out/soak.csv
echo "t_s,guests_running,guests_booted,pages_shared,pages_sharing,store_bytes,agents,memavail_kb,twinpaged_fds,twinpaged_maps,twinpaged_rss_kb" >"$csv"
sample() {
    echo "$(now),${#gpid[@]},$booted,$(counter pages_shared),$(counter pages_sharing),$(counter twinpage_store_bytes),$(counter twinpage_daemon_agents),$(memavail),$(nfds),$(nmaps),$(rss)" >>"$csv"
}

booted=0 killed=0
base_fds=$(nfds) base_maps=$(nmaps) base_rss=$(rss) base_mem=$(memavail)
cp "/proc/$daemon_pid/maps" "$out/twinpaged-maps.start"
ls -l "/proc/$daemon_pid/fd" >"$out/twinpaged-fds.start" 2>/dev/null || true
sample

boot() {
    local n=$1
    booted=$((booted + 1))
    # Seeds 1-3: guests with one seed hold the same data, which merges across
    # them; each guest verifies, rewrites 5% and verifies again for 3-10 rounds.
    local rounds=$((3 + RANDOM % 8)) seed=$((1 + RANDOM % 3))
    LD_PRELOAD=$lib TWINPAGE_DIR=$tree TWINPAGE_PAGES_TO_SCAN=20000 TWINPAGE_SLEEP_MILLISECS=20 \
        TP_MEM=$mem "$repo/scripts/boot-guest.sh" "tp.mib=$mib" "tp.seed=$seed" tp.wait=4 \
        tp.loop=1 "tp.rounds=$rounds" tp.interval=2 tp.looprewrite=5 tp.poweroff=1 \
        </dev/null >"$out/guests/$n.log" 2>"$out/guests/$n.err" &
    gpid[$n]=$!
    if [ "$kill_every" -gt 0 ] && [ $((n % kill_every)) -eq 0 ]; then
        gkill[$n]=$(($(date +%s) + 8 + RANDOM % 12))
    fi
}

log "output in $out; guests for ${secs}s, $guests at a time"
next=1
end_at=$(($(date +%s) + secs))
last_sample=$(date +%s)
while :; do
    for n in "${!gpid[@]}"; do
        if ! alive "${gpid[$n]}"; then
            wait "${gpid[$n]}" 2>/dev/null || true
            unset "gpid[$n]"
        elif [ -n "${gkill[$n]:-}" ] && [ "$(date +%s)" -ge "${gkill[$n]}" ]; then
            kill -9 "${gpid[$n]}" 2>/dev/null || true
            echo "SOAK-KILLED" >>"$out/guests/$n.log"
            killed=$((killed + 1))
            unset "gkill[$n]"
        fi
    done
    running=${#gpid[@]}
    if [ "$(date +%s)" -lt "$end_at" ]; then
        while [ "$running" -lt "$guests" ]; do boot "$next"; next=$((next + 1)); running=$((running + 1)); done
    elif [ "$running" -eq 0 ]; then
        break
    fi
    if [ $(($(date +%s) - last_sample)) -ge "$interval" ]; then sample; last_sample=$(date +%s); fi
    sleep 0.5
done
log "all guests gone at $(now) s; waiting for the daemon to settle"
# The daemon drops an agent's references when its socket closes.
for _ in $(seq 60); do
    [ "$(counter twinpage_daemon_agents)" = 0 ] && [ "$(counter twinpage_store_bytes)" = 0 ] && break
    sleep 0.5
done
sleep 2
sample
end_line=$(tail -n 1 "$csv")
cp "/proc/$daemon_pid/maps" "$out/twinpaged-maps.end"
ls -l "/proc/$daemon_pid/fd" >"$out/twinpaged-fds.end" 2>/dev/null || true

# Verdicts.
ok=0 bad=0 killed_clean=0 killed_bad=0 bad_list=""
for f in "$out"/guests/*.log; do
    n=$(basename "$f" .log)
    if grep -q SOAK-KILLED "$f"; then
        if grep -q -e TP-BAD -e "TP-VERDICT FAIL" "$f"; then killed_bad=$((killed_bad + 1)); bad_list+=" $n"; else killed_clean=$((killed_clean + 1)); fi
    elif grep -q "TP-VERDICT OK" "$f" && grep -q "TP-INFO loop done" "$f" && ! grep -q -e TP-BAD -e "TP-VERDICT FAIL" "$f"; then
        ok=$((ok + 1))
    else
        bad=$((bad + 1)); bad_list+=" $n"
    fi
done

IFS=, read -r _ _ _ end_shared end_sharing end_store end_agents end_mem end_fds end_maps end_rss <<<"$end_line"
checks=()
check() { # NAME OK(0/1) DETAIL
    checks+=("$(printf '%-34s %s  %s' "$1" "$([ "$2" = 1 ] && echo PASS || echo FAIL)" "$3")")
    [ "$2" = 1 ] || failed=1
}
failed=0
check "guest verdicts" "$([ "$bad" = 0 ] && [ "$killed_bad" = 0 ] && [ "$ok" -gt 0 ] && echo 1 || echo 0)" \
    "$ok OK, $bad not OK; $killed_clean killed with no bad page, $killed_bad with bad pages${bad_list:+ (bad:$bad_list)}"
check "store empty, no agents at the end" "$([ "$end_store" = 0 ] && [ "$end_agents" = 0 ] && echo 1 || echo 0)" \
    "store_bytes=$end_store agents=$end_agents"
check "pages_shared/sharing 0 at the end" "$([ "$end_shared" = 0 ] && [ "$end_sharing" = 0 ] && echo 1 || echo 0)" \
    "pages_shared=$end_shared pages_sharing=$end_sharing"
check "twinpaged fds back to baseline" "$([ "$end_fds" -le "$base_fds" ] && echo 1 || echo 0)" "$base_fds -> $end_fds"
# Mappings: every file or memfd mapping (a store the daemon forgot) must be
# gone. Anonymous ones may stay where glibc keeps caches: malloc arenas (2
# mappings each; twinpaged asks for one, src/sys/heap.rs, glibc's own bound
# is 8 per core) and freed thread stacks (2 each, 40 MiB of them: 20);
# beyond that they are a leak.
named() { awk 'NF >= 6' "$1" | wc -l; }
anon() { awk 'NF < 6' "$1" | wc -l; }
base_named=$(named "$out/twinpaged-maps.start") end_named=$(named "$out/twinpaged-maps.end")
base_anon=$(anon "$out/twinpaged-maps.start") end_anon=$(anon "$out/twinpaged-maps.end")
anon_limit=$((base_anon + 2 * 8 * $(nproc) + 2 * 20))
check "twinpaged mappings back to baseline" \
    "$([ "$end_named" -le "$base_named" ] && [ "$end_anon" -le "$anon_limit" ] && echo 1 || echo 0)" \
    "$base_maps -> $end_maps: file/memfd $base_named -> $end_named, anonymous $base_anon -> $end_anon (malloc arenas, thread stack cache; limit $anon_limit)"
# twinpaged trims its heap when an agent leaves (src/sys/heap.rs): 8 MiB of
# growth is a leak (a 5-minute run grew 644 kB).
check "twinpaged RSS near baseline" "$([ "$end_rss" -le $((base_rss + 8192)) ] && echo 1 || echo 0)" \
    "$base_rss -> $end_rss kB (limit +8192)"
# MemAvailable is machine-wide (other work runs here): within 256 MiB.
check "MemAvailable near baseline" "$([ "$end_mem" -ge $((base_mem - 262144)) ] && echo 1 || echo 0)" \
    "$base_mem -> $end_mem kB (limit -262144)"

minmax() { # COLUMN-NUMBER NAME
    awk -F, -v c="$1" -v n="$2" 'NR > 1 { if (min == "" || $c < min) min = $c; if ($c > max) max = $c }
        END { printf "  %-18s min %-12s max %s\n", n, min, max }' "$csv"
}
{
    echo "twinpage soak"
    echo "command:        $cmdline"
    echo "host:           $(uname -r), $(nproc) cores, $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "started:        $(date -d "@${start%.*}" '+%F %T')"
    echo "guest time:     ${secs} s (guests started until then); total $(now) s"
    echo "guests:         $booted booted, $guests at a time, ${mem} RAM, tp.mib=$mib; $killed killed with SIGKILL"
    echo "verdicts:       $ok OK, $bad not OK; killed: $killed_clean clean, $killed_bad with bad pages"
    echo "samples:        $(($(wc -l <"$csv") - 1)) every ${interval} s in soak.csv"
    echo "counters (daemon), min/max over the run:"
    minmax 2 guests_running
    minmax 4 pages_shared
    minmax 5 pages_sharing
    minmax 6 store_bytes
    minmax 7 agents
    minmax 8 memavail_kb
    minmax 9 twinpaged_fds
    minmax 10 twinpaged_maps
    minmax 11 twinpaged_rss_kb
    # First writes to merged pages over the run (every agent's, exited ones
    # too): copied by the fault thread, or in place inside a store mapping
    # when it could not take the region's lock within 200 ms (never merged
    # again: no pin check reaches them).
    awk '$1 == "twinpage_cow_breaks" { b = $2 } $1 == "twinpage_cow_in_place" { p = $2 }
        END { printf "first writes:   %d, of which %d in place (no pin check: not merged again)\n", b, p }' \
        "$tree/twinpage/stats" 2>/dev/null || true
    echo "baseline -> end: fds $base_fds -> $end_fds, maps $base_maps -> $end_maps, RSS $base_rss -> $end_rss kB, MemAvailable $base_mem -> $end_mem kB"
    echo "checks:"
    printf '  %s\n' "${checks[@]}"
    echo "result:         $([ "$failed" = 0 ] && echo PASS || echo FAIL)"
} | tee "$out/summary.txt"

# A small SVG: pages_sharing, store MiB and running guests over time.
awk -F, 'NR > 1 { t[NR] = $1; s[NR] = $5; m[NR] = $6 / 1048576; g[NR] = $2; n = NR
        if ($1 > tmax) tmax = $1; if ($5 > smax) smax = $5; if ($6 / 1048576 > mmax) mmax = $6 / 1048576; if ($2 > gmax) gmax = $2 }
    function line(arr, max, color, name, y,   i, p) {
        p = ""; for (i = 2; i <= n; i++) p = p sprintf("%.1f,%.1f ", 60 + t[i] / (tmax ? tmax : 1) * 700, 330 - arr[i] / (max ? max : 1) * 280)
        printf "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" points=\"%s\"/>\n", color, p
        printf "<text x=\"600\" y=\"%d\" fill=\"%s\">%s (max %s)</text>\n", y, color, name, max }
    END { print "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"800\" height=\"380\" font-family=\"sans-serif\" font-size=\"12\">"
        print "<rect width=\"800\" height=\"380\" fill=\"white\"/><line x1=\"60\" y1=\"330\" x2=\"760\" y2=\"330\" stroke=\"black\"/><line x1=\"60\" y1=\"50\" x2=\"60\" y2=\"330\" stroke=\"black\"/>"
        printf "<text x=\"60\" y=\"30\">twinpage soak: each line scaled to its own maximum; time 0 to %s s</text>\n", tmax
        line(s, smax, "#1f77b4", "pages_sharing", 60); line(m, sprintf("%.1f MiB", mmax) + 0, "#d62728", "store MiB", 75); line(g, gmax, "#2ca02c", "guests running", 90)
        print "</svg>" }' "$csv" >"$out/soak.svg"

[ "$failed" = 0 ]
