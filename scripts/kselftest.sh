#!/usr/bin/env bash
# Builds the kernel's own KSM selftest, unchanged, for tests/kernel_selftests.rs:
# tools/testing/selftests/vm/ksm_tests.c from Debian's linux-source-6.1 (the
# only kernel source this machine's registries carry), with its headers, into
# target/kselftest/ksm_tests. Installs linux-source-6.1 and libnuma-dev when
# missing (root, apt). Does nothing when the binary is already built.
set -euo pipefail
cd "$(dirname "$0")/.."
TP_LOG_NAME=kselftest
# shellcheck source=guest/lib.sh disable=SC1091
. scripts/guest/lib.sh

out=target/kselftest
[ -x "$out/ksm_tests" ] && { tp_log "$out/ksm_tests already built"; exit 0; }

tarball=/usr/src/linux-source-6.1.tar.xz
tp_need_file "$tarball:linux-source-6.1" /usr/include/numa.h:libnuma-dev
tp_need gcc:gcc

tp_log "extracting ksm_tests.c and its headers from $tarball ($(dpkg-query -W -f '${Version}' linux-source-6.1))"
rm -rf "$out" && mkdir -p "$out"
top=linux-source-6.1
tar -xJf "$tarball" -C "$out" \
    "$top/tools/testing/selftests/vm/ksm_tests.c" \
    "$top/tools/testing/selftests/vm/util.h" \
    "$top/tools/testing/selftests/kselftest.h" \
    "$top/include/vdso/time64.h"

# As the selftests' Makefile builds it: `<include/vdso/time64.h>` is found
# from the source tree's top.
gcc -O2 -Wall -I "$out/$top" -o "$out/ksm_tests.tmp" "$out/$top/tools/testing/selftests/vm/ksm_tests.c" -lnuma
mv "$out/ksm_tests.tmp" "$out/ksm_tests"
tp_log "built $out/ksm_tests"
