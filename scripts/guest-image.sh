#!/usr/bin/env bash
# Build the twinpage test guest for QEMU (TCG): a Debian 12 cloud kernel and
# an initramfs with static busybox, the virtio modules it needs, /init and the
# workload (scripts/guest/workload.c).
#
# usage: scripts/guest-image.sh [OUT]        OUT defaults to target/guest
# makes: OUT/vmlinuz  OUT/initrd.cpio.gz  OUT/image.info
#
# Installs what it needs with apt on a fresh machine. Rebuilds only when the
# sources (this script, scripts/guest/*) or the settings below change;
# otherwise returns at once. Safe to run concurrently (flock on OUT/.lock).
#
# environment:
#   TP_KERNEL_PKG  kernel package (default: what linux-image-cloud-amd64 depends on)
#   TP_MODULES     modules to load in the guest, dependencies added
#                  (default: virtio_pci virtio_balloon virtio_console virtio_blk)
#   TP_REBUILD=1   rebuild even if the image is up to date
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
src=$here/guest
export TP_LOG_NAME=guest-image
# shellcheck source=guest/lib.sh disable=SC1091
. "$src/lib.sh"

out=${1:-$repo/target/guest}
modules=${TP_MODULES:-virtio_pci virtio_balloon virtio_console virtio_blk}
kernel_meta=linux-image-cloud-amd64

mkdir -p "$out"
out=$(cd "$out" && pwd)
exec 9>"$out/.lock"
flock 9

stamp=$(
    {
        cat "$here/guest-image.sh" "$src/lib.sh" "$src/init" "$src/workload.c"
        printf 'kernel=%s\nmodules=%s\n' "${TP_KERNEL_PKG:-}" "$modules"
    } | sha256sum | cut -d' ' -f1
)
if [ "${TP_REBUILD:-0}" != 1 ] && [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.cpio.gz" ] &&
    [ "$(cat "$out/image.stamp" 2>/dev/null)" = "$stamp" ]; then
    exit 0
fi

t0=$(date +%s.%N)
tp_need gcc:gcc cpio:cpio gzip:gzip dpkg-deb:dpkg
libc_a=$(gcc -print-file-name=libc.a)
[ -f "$libc_a" ] || tp_apt_install libc6-dev

tmp=$(mktemp -d "${TMPDIR:-/tmp}/tp-guest.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# --- packages -------------------------------------------------------------
if [ -n "${TP_KERNEL_PKG:-}" ]; then
    kpkg=$TP_KERNEL_PKG
else
    tp_apt_known "$kernel_meta" || tp_die "apt does not know $kernel_meta"
    kpkg=$(apt-cache depends "$kernel_meta" |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
    [ -n "$kpkg" ] || tp_die "cannot resolve the kernel package behind $kernel_meta"
fi
tp_apt_known "$kpkg" || tp_die "apt does not know $kpkg"
tp_apt_known busybox-static || tp_die "apt does not know busybox-static"

tp_log "downloading $kpkg busybox-static"
dl=(apt-get download -qq)
[ "$(id -u)" -eq 0 ] && dl+=(-o APT::Sandbox::User=root)
if ! (cd "$tmp" && "${dl[@]}" "$kpkg" busybox-static) >&2; then
    # A machine's package lists may be older than the archive: refresh them,
    # resolve the kernel again, and retry once.
    tp_apt_update
    if [ -z "${TP_KERNEL_PKG:-}" ]; then
        kpkg=$(apt-cache depends "$kernel_meta" |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
    fi
    (cd "$tmp" && "${dl[@]}" "$kpkg" busybox-static) >&2 || tp_die "apt-get download failed"
fi
kdeb=$(ls "$tmp"/"$kpkg"_*.deb)
bdeb=$(ls "$tmp"/busybox-static_*.deb)
dpkg-deb -x "$kdeb" "$tmp/kernel"
dpkg-deb -x "$bdeb" "$tmp/busybox"

vmlinuz=$(ls "$tmp"/kernel/boot/vmlinuz-*)
kver=${vmlinuz##*/vmlinuz-}
moddir=
for d in "$tmp/kernel/lib/modules/$kver" "$tmp/kernel/usr/lib/modules/$kver"; do
    [ -d "$d" ] && moddir=$d
done
[ -n "$moddir" ] || tp_die "no modules directory for $kver in $kpkg"

# --- initramfs tree -------------------------------------------------------
root=$tmp/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,lib/modules}
install -m 0755 "$tmp/busybox/bin/busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list-full); do
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
install -m 0755 "$src/init" "$root/init"
gcc -static -pthread -O2 -Wall -Wextra -s -o "$root/bin/tp-workload" "$src/workload.c"
if [ "$(id -u)" -eq 0 ]; then
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3
fi

# Modules: the listed ones that are not built in, with their dependencies
# (from each .ko's modinfo "depends="), in load order.
declare -A modpath=() seen=()
while IFS= read -r f; do
    n=${f##*/}
    n=${n%%.ko*}
    modpath[${n//-/_}]=$f
done < <(find "$moddir/kernel" -name '*.ko*')

ko_cat() { # decompress a module file to stdout
    case "$1" in
    *.ko.xz) xz -dc "$1" ;;
    *.ko.zst) zstd -dcq "$1" ;;
    *.ko.gz) gzip -dc "$1" ;;
    *) cat "$1" ;;
    esac
}
load_order=()
builtin_mods=()
add_module() {
    local m=${1//-/_} f d deps
    [ -z "${seen[$m]:-}" ] || return 0
    seen[$m]=1
    f=${modpath[$m]:-}
    if [ -z "$f" ]; then
        if grep -qE "/${m//_/[_-]}\.ko" "$moddir/modules.builtin" 2>/dev/null; then
            builtin_mods+=("$m")
            return 0
        fi
        tp_die "module $m is neither a module nor built into $kver"
    fi
    ko_cat "$f" >"$root/lib/modules/$m.ko"
    deps=$(tr '\0' '\n' <"$root/lib/modules/$m.ko" | sed -n 's/^depends=//p')
    for d in ${deps//,/ }; do add_module "$d"; done
    load_order+=("$m")
}
for m in $modules; do add_module "$m"; done
printf '%s\n' "${load_order[@]}" >"$root/lib/modules/load.order"

# --- outputs --------------------------------------------------------------
(cd "$root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null --quiet -o -H newc --owner=0:0 --reproducible) | gzip -9n >"$tmp/initrd.cpio.gz"
cp "$vmlinuz" "$tmp/vmlinuz"
bbver=$(dpkg-deb -f "$bdeb" Version)
kdebver=$(dpkg-deb -f "$kdeb" Version)
{
    echo "kernel_package=$kpkg"
    echo "kernel_package_version=$kdebver"
    echo "kernel_release=$kver"
    echo "busybox_static_version=$bbver"
    echo "modules_loaded=${load_order[*]}"
    echo "modules_builtin=${builtin_mods[*]}"
    echo "initrd_bytes=$(stat -c %s "$tmp/initrd.cpio.gz")"
    echo "vmlinuz_bytes=$(stat -c %s "$tmp/vmlinuz")"
} >"$tmp/image.info"

rm -f "$out/image.stamp"
mv -f "$tmp/vmlinuz" "$out/vmlinuz"
mv -f "$tmp/initrd.cpio.gz" "$out/initrd.cpio.gz"
mv -f "$tmp/image.info" "$out/image.info"
echo "$stamp" >"$out/image.stamp"
t1=$(date +%s.%N)
tp_log "built $out ($kpkg, modules: ${load_order[*]:-none}) in $(awk "BEGIN{printf \"%.1f\", $t1-$t0}")s"
