#!/usr/bin/env bash
# Boot the twinpage test guest (built by scripts/guest-image.sh, which this
# runs first; it returns at once when the image is up to date) under QEMU TCG
# with the serial console on stdout. The script execs QEMU, so its pid is
# QEMU's pid.
#
# usage: scripts/boot-guest.sh [tp.KEY=VAL ...] [QEMU ARG ...] [-- QEMU ARG ...]
#   tp.KEY=VAL arguments (before any --) go to the kernel command line, where
#   the guest's workload reads them (tp.mib, tp.dup, tp.patterns, tp.wait,
#   tp.rewrite, tp.poweroff, tp.loop, ...; see scripts/guest/README.md).
#   Everything else is passed to QEMU unchanged, e.g.
#     -object memory-backend-file,id=mem,size=512M,mem-path=/dev/shm/vm1,share=off
#     -machine memory-backend=mem  -qmp unix:/tmp/qmp.sock,server=on,wait=off
#     -device virtio-balloon
#
# environment:
#   TP_GUEST_DIR  image directory (default target/guest)
#   TP_MEM        guest RAM for -m (default 512M; ignored if -m is given)
#   TP_ACCEL      accelerator (default tcg)
#   TP_APPEND     extra kernel command line words
#   TP_QEMU       QEMU binary (default qemu-system-x86_64, installed if missing)
#   LD_PRELOAD    applied to QEMU only, not to the build steps before it
set -euo pipefail

preload=${LD_PRELOAD-}
unset LD_PRELOAD

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
export TP_LOG_NAME=boot-guest
# shellcheck source=guest/lib.sh disable=SC1091
. "$here/guest/lib.sh"

dir=${TP_GUEST_DIR:-$repo/target/guest}
"$here/guest-image.sh" "$dir"

qemu=${TP_QEMU:-qemu-system-x86_64}
[ -n "${TP_QEMU:-}" ] || tp_need qemu-system-x86_64:qemu-system-x86

append="console=ttyS0 quiet panic=-1"
[ -z "${TP_APPEND:-}" ] || append+=" $TP_APPEND"
extra=()
have_m=0
passthrough=0
for a in "$@"; do
    if [ "$passthrough" = 0 ]; then
        case "$a" in
        --) passthrough=1; continue ;;
        tp.*=*) append+=" $a"; continue ;;
        esac
    fi
    [ "$a" != -m ] || have_m=1
    extra+=("$a")
done

cmd=("$qemu" -accel "${TP_ACCEL:-tcg}")
[ "$have_m" = 1 ] || cmd+=(-m "${TP_MEM:-512M}")
cmd+=(-nographic -no-reboot -nic none
    -kernel "$dir/vmlinuz" -initrd "$dir/initrd.cpio.gz" -append "$append"
    "${extra[@]}")

tp_log "${cmd[*]}"
[ -z "$preload" ] || export LD_PRELOAD="$preload"
exec "${cmd[@]}"
