#!/usr/bin/env bash
# twinpage under libvirt, end to end, as docs/using.md ("libvirt") describes
# it: Debian's libvirt runs a TCG domain whose QEMU preloads libtwinpage.so
# and merges through twinpaged; the domain's name shows in `twinpage stat`.
# Installs what it needs, starts virtlogd, libvirtd and twinpaged by hand
# (systemd need not run), defines and starts the domain, checks, and puts
# everything back (qemu.conf, the /dev/userfaultfd ACL, /dev/kvm's mode).
# Exits non-zero on any failure. Run as root on a host where libvirtd is not
# running yet (its qemu.conf is changed for the run).
#
# usage: scripts/libvirt-recipe.sh [user|root]
#   user (default): QEMU runs as libvirt-qemu, as libvirt's default; it gets
#                   /dev/userfaultfd through an ACL and cgroup_device_acl,
#                   and twinpaged runs as libvirt-qemu too
#   root:           qemu.conf user/group = root; twinpaged as root
# environment: TIMEOUT (s, default 120), KEEP=1 (leave it all running)
set -euo pipefail

MODE=${1:-user}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
export TP_LOG_NAME=libvirt-recipe
# shellcheck source=guest/lib.sh disable=SC1091
. "$here/guest/lib.sh"

TP=$repo/target/release
W=${TP_LIBVIRT_DIR:-/tmp/twinpage-libvirt}
TREE=$W/tree
NAME=twinpage-libvirt
CONSOLE=$W/$NAME.console
TIMEOUT=${TIMEOUT:-120}
DUP_PAGES=8192 # tp.mib=64 tp.dup=50: 16384 pages, 8192 of them copies of 16 patterns
QEMU_CONF=/etc/libvirt/qemu.conf
export LIBVIRT_DEFAULT_URI=qemu:///system

log() { printf '[%s] %s\n' "$(date +%T.%3N)" "$*"; }
die() { log "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
case $MODE in user | root) ;; *) die "usage: $0 [user|root]" ;; esac
[ "$(id -u)" = 0 ] || die "run as root (it configures libvirt and /dev/userfaultfd)"

# --- 0. prerequisites ------------------------------------------------------------
log "prerequisites"
tp_need libvirtd:libvirt-daemon-system virsh:libvirt-clients setfacl:acl qemu-system-x86_64:qemu-system-x86
dpkg -s libvirt-daemon-driver-qemu >/dev/null 2>&1 || tp_apt_install libvirt-daemon-driver-qemu
"$here/guest-image.sh" >/dev/null
for f in "$TP/libtwinpage.so" "$TP/twinpaged" "$TP/twinpage"; do
    [ -r "$f" ] || die "missing $f (cargo build --release --workspace)"
done
# Running (a zombie left by a container's PID 1 that does not reap is not).
running() { ps -eo stat=,comm= | awk -v c="$1" '$1 !~ /^Z/ && $2 == c { f = 1 } END { exit !f }'; }
! running libvirtd || die "libvirtd is already running: stop it first (qemu.conf changes need a restart)"
! running virtlogd || die "virtlogd is already running: stop it first"
rm -rf "$W"
mkdir -p "$W"

# --- teardown, on every exit -------------------------------------------------------
teardown() {
    local rc=$?
    set +e
    if [ "${KEEP:-0}" = 1 ]; then log "KEEP=1: leaving everything running"; return; fi
    log "teardown"
    if [ -S /run/libvirt/libvirt-sock ]; then
        virsh destroy "$NAME" >/dev/null 2>&1
        virsh undefine "$NAME" >/dev/null 2>&1
    fi
    for p in twinpaged libvirtd virtlogd; do
        [ -s "$W/$p.pid" ] && kill "$(cat "$W/$p.pid")" 2>/dev/null
    done
    sleep 1
    [ -f "$W/qemu.conf.backup" ] && cp -a "$W/qemu.conf.backup" "$QEMU_CONF"
    [ -f "$W/userfaultfd.acl" ] && setfacl --restore="$W/userfaultfd.acl"
    [ -n "${kvm_was:-}" ] && chmod "${kvm_was% *}" /dev/kvm && chgrp "${kvm_was#* }" /dev/kvm
    [ "$rc" = 0 ] && rm -rf "$W"
    log "exit status $rc"
}
trap teardown EXIT

# --- 1. configuration ----------------------------------------------------------------
cp -a "$QEMU_CONF" "$W/qemu.conf.backup"
if [ "$MODE" = user ]; then
    # A non-root QEMU needs /dev/userfaultfd (vm.unprivileged_userfaultfd is
    # 0 on Debian); libvirt's device cgroup and private /dev let through only
    # the devices cgroup_device_acl lists (libvirt's default list plus it).
    getfacl -p /dev/userfaultfd >"$W/userfaultfd.acl"
    setfacl -m u:libvirt-qemu:rw /dev/userfaultfd
    cat >>"$QEMU_CONF" <<'EOF'
# twinpage: QEMU opens /dev/userfaultfd (device cgroup and private /dev)
cgroup_device_acl = [ "/dev/null", "/dev/full", "/dev/zero", "/dev/random", "/dev/urandom",
                      "/dev/ptmx", "/dev/kvm", "/dev/userfaultfd" ]
EOF
else
    printf '# twinpage: QEMU as root\nuser = "root"\ngroup = "root"\n' >>"$QEMU_CONF"
fi
# Without udev (a container) /dev/kvm is 0600 root: libvirt then probes QEMU
# again at every lookup (define takes 40 s). Give it udev's mode for the run.
if [ "$MODE" = user ] && [ -c /dev/kvm ] && getent group kvm >/dev/null; then
    kvm_was=$(stat -c '%a %G' /dev/kvm)
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi
# Copies: libvirt's DAC driver chowns <kernel> and <initrd> while the domain runs.
mkdir -p "$W/guest"
cp "$repo/target/guest/vmlinuz" "$repo/target/guest/initrd.cpio.gz" "$W/guest/"
cat >"$W/domain.xml" <<EOF
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>$NAME</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$W/guest/vmlinuz</kernel>
    <initrd>$W/guest/initrd.cpio.gz</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 tp.mib=64 tp.dup=50 tp.patterns=16 tp.wait=20</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='$CONSOLE'/><target port='0'/></serial>
    <console type='file'><source path='$CONSOLE'/><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:env name='LD_PRELOAD' value='$TP/libtwinpage.so'/>
    <qemu:env name='TWINPAGE_DIR' value='$TREE'/>
  </qemu:commandline>
</domain>
EOF

# --- 2. daemons ----------------------------------------------------------------------
log "starting virtlogd, libvirtd"
virtlogd -d -p "$W/virtlogd.pid"
LIBVIRT_LOG_OUTPUTS="3:file:$W/libvirtd.log" libvirtd -d -p "$W/libvirtd.pid"
for _ in $(seq 100); do virsh version >/dev/null 2>&1 && break; sleep 0.2; done
virsh version >/dev/null || die "libvirtd does not answer"

log "starting twinpaged ($MODE)"
if [ "$MODE" = user ]; then
    # Every agent publishes into the tree, which only its owner writes: the
    # daemon runs as the user QEMU runs as.
    install -d -o libvirt-qemu -g libvirt-qemu -m 0755 "$TREE"
    setsid setpriv --reuid=libvirt-qemu --regid=libvirt-qemu --init-groups \
        env TWINPAGE_LOG=info "$TP/twinpaged" --dir "$TREE" --keep-max-map-count >"$W/twinpaged.log" 2>&1 </dev/null &
else
    TWINPAGE_LOG=info setsid "$TP/twinpaged" --dir "$TREE" >"$W/twinpaged.log" 2>&1 </dev/null &
fi
echo $! >"$W/twinpaged.pid"
for _ in $(seq 50); do [ -S "$TREE/twinpaged.sock" ] && break; sleep 0.1; done
[ -S "$TREE/twinpaged.sock" ] || die "twinpaged did not start: $(cat "$W/twinpaged.log")"
"$TP/twinpage" set --dir "$TREE" pages_to_scan 5000

# --- 3. the domain ---------------------------------------------------------------------
: >"$CONSOLE"
virsh define "$W/domain.xml" >/dev/null
t0=$(now)
virsh start "$NAME" >/dev/null || die "virsh start failed: $(tail -3 "/var/log/libvirt/qemu/$NAME.log")"
pid=$(cat "/run/libvirt/qemu/$NAME.pid")
log "virsh start returned after $(since "$t0") s: QEMU pid $pid, user $(ps -o user= -p "$pid")"

# --- 4. checks ---------------------------------------------------------------------------
grep -q libtwinpage.so "/proc/$pid/maps" || die "libtwinpage.so is not in /proc/$pid/maps"
deadline=$(($(date +%s) + TIMEOUT))
wait_for() { # what, command...
    local what=$1
    shift
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] ||
            die "timed out waiting for $what; domain log: $(grep twinpage: "/var/log/libvirt/qemu/$NAME.log" | tail -3)"
        sleep 0.2
    done
}
on_console() { grep -q "$1" "$CONSOLE"; }
wait_for "the agent's files (tree/proc/$pid)" test -r "$TREE/proc/$pid/twinpage_counters"
wait_for "TP-READY on the console" on_console TP-READY
# Merged: the guest's duplicates are in and the count has settled (within 1%
# for 2 s).
last=-1 stable=0
settled() {
    local m d
    m=$(cat "$TREE/proc/$pid/ksm_merging_pages")
    d=$((m - last))
    d=${d#-}
    if [ "$m" -ge "$DUP_PAGES" ] && [ "$d" -le $((m / 100)) ]; then stable=$((stable + 1)); else stable=0; fi
    last=$m
    [ "$stable" -ge 10 ]
}
wait_for "ksm_merging_pages to reach $DUP_PAGES and settle" settled
counter() { awk -v n="$1" '$1 == n { print $2 }' "$TREE/proc/$pid/twinpage_counters"; }
agents=$(counter twinpage_daemon_agents)
through=$(counter twinpage_daemon_merged)
[ "$agents" = 1 ] || die "the agent is not connected to twinpaged (twinpage_daemon_agents=$agents)"
[ "${through:-0}" -gt 0 ] || die "nothing merged through twinpaged"
log "merged $(since "$t0") s after virsh start: ksm_merging_pages=$last, $through through twinpaged"
"$TP/twinpage" stat --dir "$TREE" | tail -3
"$TP/twinpage" stat --dir "$TREE" | grep -Eq "^ *$pid +$NAME " || die "twinpage stat does not name $pid $NAME"
wait_for "TP-VERDICT on the console" on_console TP-VERDICT
v=$(tr -d '\r' <"$CONSOLE" | grep TP-VERDICT)
[ "$v" = "TP-VERDICT OK" ] || die "guest verdict: $v"
log "guest: $v after $(since "$t0") s; OK ($MODE)"
