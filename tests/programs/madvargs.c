/* madvise(MADV_MERGEABLE / MADV_UNMERGEABLE) with the arguments programs get
 * wrong or rely on: a zero length, an unaligned start, a length that is not
 * a page multiple, a length that overflows, ranges with holes and ranges
 * with nothing mapped, and mappings KSM leaves alone or takes as they are
 * (shared anonymous, a private and a shared file mapping, PROT_NONE,
 * mlocked). Prints one line per call ("name: 0" or
 * "name: -1 ERRNO"), compared between the kernel and twinpage; "MADVARGS
 * DONE" at the end. Marks nothing mergeable that has content. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PS 4096

static void call(const char *name, void *addr, size_t len, int advice) {
    errno = 0;
    int r = madvise(addr, len, advice);
    if (r == 0) printf("%s: 0\n", name);
    else printf("%s: %d %s\n", name, r, strerrorname_np(errno));
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    /* Four pages; the third unmapped: a hole. */
    char *m = mmap(NULL, 4 * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED || munmap(m + 2 * PS, PS)) { printf("MAP FAIL\n"); return 2; }
    /* A page-aligned address with nothing mapped: the hole's. */
    char *none = m + 2 * PS;
    char path[] = "/tmp/madvargs-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0 || unlink(path) || ftruncate(fd, 2 * PS)) { printf("FILE FAIL\n"); return 2; }
    int rw = PROT_READ | PROT_WRITE;
    char *shared = mmap(NULL, 2 * PS, rw, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    char *file_private = mmap(NULL, 2 * PS, rw, MAP_PRIVATE, fd, 0);
    char *file_shared = mmap(NULL, 2 * PS, rw, MAP_SHARED, fd, 0);
    char *prot_none = mmap(NULL, 2 * PS, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *locked = mmap(NULL, 2 * PS, rw, MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED, -1, 0);
    if (shared == MAP_FAILED || file_private == MAP_FAILED || file_shared == MAP_FAILED || prot_none == MAP_FAILED || locked == MAP_FAILED) {
        printf("MAP FAIL\n");
        return 2;
    }
    int advice[] = {MADV_MERGEABLE, MADV_UNMERGEABLE};
    const char *names[] = {"mergeable", "unmergeable"};
    for (int i = 0; i < 2; i++) {
        char n[64];
#define CALL(what, a, l) (snprintf(n, sizeof n, "%s %s", names[i], what), call(n, a, l, advice[i]))
        CALL("zero length", m, 0);
        CALL("zero length, unmapped", none, 0);
        CALL("zero length, unaligned", m + 1, 0);
        CALL("unaligned", m + 1, PS);
        CALL("one byte", m, 1);
        CALL("page and a byte", m, PS + 1);
        CALL("length overflows", m, SIZE_MAX - 10);
        CALL("end overflows", m, (size_t)0 - (uintptr_t)m);
        CALL("unmapped", none, PS);
        CALL("across a hole", m, 4 * PS);
        CALL("mapped", m, 2 * PS);
        CALL("shared anonymous", shared, 2 * PS);
        CALL("private file", file_private, 2 * PS);
        CALL("shared file", file_shared, 2 * PS);
        CALL("PROT_NONE", prot_none, 2 * PS);
        CALL("mlocked", locked, 2 * PS);
    }
    printf("MADVARGS DONE\n");
    return 0;
}
