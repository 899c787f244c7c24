# shellcheck shell=bash
# Helpers shared by scripts/guest-image.sh and scripts/boot-guest.sh.
# Sourced, not run. Installs what a fresh Debian 12 machine lacks, via apt,
# running `apt-get update` at most once per script run and only when needed.

tp_log() { printf '%s: %s\n' "${TP_LOG_NAME:-twinpage-guest}" "$*" >&2; }
tp_die() { tp_log "error: $*"; exit 1; }

if [ "$(id -u)" -eq 0 ]; then TP_SUDO=(); else TP_SUDO=(sudo); fi

# Scripts run side by side (two guests booting at once) take turns at apt
# instead of failing on its lock: every apt run here holds this file's lock.
TP_APT_LOCK=${TP_APT_LOCK:-/tmp/twinpage-apt.lock}
tp_apt() {
    "${TP_SUDO[@]}" flock -w 900 "$TP_APT_LOCK" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 "$@"
}

tp_apt_updated=0
tp_apt_update() {
    [ "$tp_apt_updated" = 1 ] && return 0
    tp_log "apt-get update"
    tp_apt update -qq >&2 || tp_die "apt-get update failed"
    tp_apt_updated=1
}

# tp_apt_install PKG...: install packages (no recommends), updating lists once.
tp_apt_install() {
    tp_apt_update
    tp_log "apt-get install $*"
    tp_apt install -y -qq --no-install-recommends "$@" >&2 || tp_die "apt-get install $* failed"
}

# tp_need CMD:PKG...: install PKG for every CMD not found on PATH (one apt run).
tp_need() {
    local spec missing=()
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
    done
    [ "${#missing[@]}" -eq 0 ] || tp_apt_install "${missing[@]}"
}

# tp_need_file PATH:PKG...: same, for files (e.g. static libc.a).
tp_need_file() {
    local spec missing=()
    for spec in "$@"; do
        [ -e "${spec%%:*}" ] || missing+=("${spec#*:}")
    done
    [ "${#missing[@]}" -eq 0 ] || tp_apt_install "${missing[@]}"
}

# tp_apt_known PKG: true if apt's lists know PKG (updates lists once if not).
tp_apt_known() {
    apt-cache show --no-all-versions "$1" >/dev/null 2>&1 && return 0
    tp_apt_update
    apt-cache show --no-all-versions "$1" >/dev/null 2>&1
}
