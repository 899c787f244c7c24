#!/usr/bin/env bash
# Install twinpage on this host, or take it out again.
#
# usage: scripts/install.sh [options]
#        scripts/install.sh --uninstall [--prefix P] [--destdir D]
#
#   --prefix P        where binaries and the preload go (default /usr/local;
#                     env PREFIX)
#   --destdir D       stage everything under D (packaging; env DESTDIR):
#                     nothing is started, enabled or applied
#   --enable          enable and start twinpaged (systemd), or print the
#                     command line that starts it where systemd is not running
#   --store-dir DIR   keep the stores on a tmpfs mounted at DIR (mounted by
#                     the unit before twinpaged starts), of --store-size
#   --store-size S    its size (default 4G)
#   --no-sysctl       do not install the vm.max_map_count drop-in
#   --uninstall       remove exactly what an install put there (its manifest)
#
# Installs (paths under DESTDIR):
#   PREFIX/bin/twinpage, PREFIX/bin/twinpaged
#   PREFIX/lib/twinpage/libtwinpage.so         the LD_PRELOAD agent
#   /etc/systemd/system/twinpaged.service      its ExecStart pointing at PREFIX
#   /etc/systemd/system/twinpaged.service.d/store.conf   with --store-dir
#   /etc/sysctl.d/60-twinpage.conf             vm.max_map_count = 1048576
#   PREFIX/share/twinpage/install-manifest     what --uninstall removes
# Builds the release binaries first if target/release lacks them.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
prefix=${PREFIX:-/usr/local}
destdir=${DESTDIR:-}
enable=0
uninstall=0
sysctl=1
store_dir=
store_size=4G

die() { echo "install.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
    --prefix) prefix=${2:?--prefix needs a path}; shift ;;
    --destdir) destdir=${2:?--destdir needs a path}; shift ;;
    --enable) enable=1 ;;
    --store-dir) store_dir=${2:?--store-dir needs a path}; shift ;;
    --store-size) store_size=${2:?--store-size needs a size}; shift ;;
    --no-sysctl) sysctl=0 ;;
    --uninstall) uninstall=1 ;;
    -h | --help) sed -n '2,28p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
case "$prefix" in /*) ;; *) die "--prefix must be absolute, not $prefix" ;; esac
case "$store_dir" in "" | /*) ;; *) die "--store-dir must be absolute, not $store_dir" ;; esac
[[ "$store_size" =~ ^[0-9]+[KMG]?$ ]] || die "--store-size must be a size such as 4G, not $store_size"

manifest_rel=$prefix/share/twinpage/install-manifest
manifest=$destdir$manifest_rel
systemd_running() { [ -z "$destdir" ] && [ -d /run/systemd/system ]; }

if [ "$uninstall" = 1 ]; then
    [ -f "$manifest" ] || die "no install manifest at $manifest: nothing installed there"
    if systemd_running && systemctl is-enabled --quiet twinpaged 2>/dev/null; then
        systemctl disable --now twinpaged || true
    fi
    # Files first (as listed), then the directories the install created,
    # deepest first, where empty.
    mapfile -t files <"$manifest"
    mapfile -t made < <(sort -r "$manifest.dirs" 2>/dev/null)
    for f in "${files[@]}"; do
        [ -n "$f" ] && rm -f "$destdir$f"
    done
    rm -f "$manifest" "$manifest.dirs"
    for d in "${made[@]}"; do
        [ -n "$d" ] && rmdir "$destdir${d%/}" 2>/dev/null || true
    done
    systemd_running && systemctl daemon-reload || true
    echo "twinpage removed from $destdir$prefix (the tree under /run/twinpage and any raised vm.max_map_count stay until reboot)"
    exit 0
fi

for b in twinpage twinpaged libtwinpage.so; do
    if [ ! -e "$repo/target/release/$b" ]; then
        (cd "$repo" && cargo build --release --workspace)
        break
    fi
done

installed=()
dirs=()
ensure_dir() { # ensure_dir DIR: create DESTDIR/DIR, remembering each level made
    local d=$1
    while [ ! -d "$destdir$d" ]; do
        dirs+=("$d/")
        d=$(dirname "$d")
    done
    mkdir -p "$destdir$1"
}
put() { # put MODE SRC DEST: install SRC at DESTDIR/DEST, remember DEST
    local mode=$1 src=$2 dst=$3
    ensure_dir "$(dirname "$dst")"
    install -m "$mode" "$src" "$destdir$dst"
    installed+=("$dst")
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
put 0755 "$repo/target/release/twinpage" "$prefix/bin/twinpage"
put 0755 "$repo/target/release/twinpaged" "$prefix/bin/twinpaged"
put 0644 "$repo/target/release/libtwinpage.so" "$prefix/lib/twinpage/libtwinpage.so"
sed -e "s|/usr/local/bin/twinpaged|$prefix/bin/twinpaged|" \
    -e "s|LD_PRELOAD=/path/to/libtwinpage.so|LD_PRELOAD=$prefix/lib/twinpage/libtwinpage.so|" \
    "$here/twinpaged.service" >"$tmp/twinpaged.service"
put 0644 "$tmp/twinpaged.service" /etc/systemd/system/twinpaged.service
if [ -n "$store_dir" ]; then
    cat >"$tmp/store.conf" <<EOF
# Stores on a tmpfs of $store_size at $store_dir (scripts/install.sh --store-dir):
# when it is full, new merges wait for space (twinpage_store_full).
[Service]
Environment=TWINPAGE_STORE_DIR=$store_dir
ExecStartPre=+/bin/sh -c 'mkdir -p $store_dir && (mountpoint -q $store_dir || mount -t tmpfs -o size=$store_size,mode=0755 tmpfs $store_dir)'
EOF
    put 0644 "$tmp/store.conf" /etc/systemd/system/twinpaged.service.d/store.conf
fi
if [ "$sysctl" = 1 ]; then
    cat >"$tmp/60-twinpage.conf" <<'EOF'
# twinpage: each merged page that stands alone costs its process one mapping
# (kernel KSM needs none), and the kernel caps a process at vm.max_map_count.
# At Debian's 65530 a guest of scattered duplicates merges about half of what
# ksmd merges. 1048576 is Fedora's, Ubuntu's and Arch's default; each mapping
# in use costs ~200 bytes of kernel memory against the 4 KiB page it saves.
# (twinpaged running as root raises it further when its guests need it.)
vm.max_map_count = 1048576
EOF
    put 0644 "$tmp/60-twinpage.conf" /etc/sysctl.d/60-twinpage.conf
fi
ensure_dir "$(dirname "$manifest_rel")"
printf '%s\n' "${installed[@]}" >"$manifest"
printf '%s\n' "${dirs[@]}" >"$manifest.dirs"
echo "installed into $destdir$prefix and $destdir/etc:"
printf '  %s\n' "${installed[@]}"

if [ -z "$destdir" ] && [ "$sysctl" = 1 ] && [ "$(id -u)" -eq 0 ]; then
    sysctl -q -p /etc/sysctl.d/60-twinpage.conf || echo "install.sh: could not apply vm.max_map_count now; it applies at boot" >&2
fi
start="TWINPAGE_LOG=info $prefix/bin/twinpaged --dir /run/twinpage --sysfs /run/twinpage/sysfs"
[ -z "$store_dir" ] || start="TWINPAGE_STORE_DIR=$store_dir $start"
if [ "$enable" = 1 ] && [ -z "$destdir" ]; then
    if systemd_running; then
        systemctl daemon-reload
        systemctl enable --now twinpaged
        echo "twinpaged enabled and started (systemctl status twinpaged)"
    else
        echo "systemd is not running here; start the daemon with:"
        echo "  $start &"
    fi
fi
echo "start guests with: LD_PRELOAD=$prefix/lib/twinpage/libtwinpage.so TWINPAGE_DIR=/run/twinpage qemu-system-x86_64 ..."
echo "read and write the tunables and counters as on sysfs under /run/twinpage/sysfs/kernel/mm/ksm (node_exporter: --path.sysfs=/run/twinpage/sysfs)"
