/* mremap of merged memory, which merging may leave split into several
 * mappings that the kernel's mremap refuses (EFAULT) and the preload then
 * emulates. Guest RAM carries DONTFORK and DONTDUMP (QEMU sets them). After
 * a move that grows the range, every byte must be where it was, the grown
 * tail zero, and the moved range mapped. With "advice" as its argument it
 * also requires every moved mapping to carry both flags (smaps VmFlags "dc"
 * and "dd"), a moment after the move. Prints "MREMAP OK", or
 * "MREMAP FAIL ..." and exits 1; exits 2 on a setup error. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PS 4096UL
#define N 512UL /* 2 MiB: ranges of 1 MiB and more get their advice read and kept */

/* Pages of this process merged so far, from the tree's ksm_merging_pages. */
static long merging(void) {
    char path[512];
    const char *dir = getenv("TWINPAGE_DIR");
    snprintf(path, sizeof path, "%s/proc/%d/ksm_merging_pages", dir ? dir : "/run/twinpage", getpid());
    FILE *f = fopen(path, "r");
    long v = -1;
    if (f && fscanf(f, "%ld", &v) != 1) v = -1;
    if (f) fclose(f);
    return v;
}

/* Whether every mapping overlapping [a, a+len) has both flags in smaps. */
static int flags_kept(unsigned long a, unsigned long len, int *seen) {
    FILE *f = fopen("/proc/self/smaps", "r");
    char ln[512];
    unsigned long s = 0, e = 0;
    int in = 0, ok = 1;
    *seen = 0;
    while (f && fgets(ln, sizeof ln, f)) {
        unsigned long x, y;
        if (sscanf(ln, "%lx-%lx ", &x, &y) == 2 && strchr(ln, '-') < strchr(ln, ' ')) {
            s = x; e = y;
            in = s < a + len && e > a;
        } else if (in && !strncmp(ln, "VmFlags:", 8)) {
            (*seen)++;
            if (!strstr(ln, " dc") || !strstr(ln, " dd")) {
                printf("MREMAP NOTE advice lost %lx-%lx:%s", s, e, ln + 8);
                ok = 0;
            }
        }
    }
    if (f) fclose(f);
    return ok;
}

int main(int argc, char **argv) {
    int check_advice = argc > 1 && !strcmp(argv[1], "advice");
    /* The range, and right after it an inaccessible page, so that growing
     * must move it. */
    unsigned char *p = mmap(NULL, (N + 1) * PS, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED || mprotect(p, N * PS, PROT_READ | PROT_WRITE)) { perror("mmap"); return 2; }
    /* Pairs of equal pages, every other pair unique, so merging leaves
     * merged stretches between unmerged ones. */
    for (unsigned long i = 0; i < N; i++) memset(p + i * PS, (i / 2) % 2 ? (int)(i | 1) : 7, PS);
    if (madvise(p, N * PS, MADV_DONTFORK) || madvise(p, N * PS, MADV_DONTDUMP)) { perror("madvise"); return 2; }
    if (madvise(p, N * PS, MADV_MERGEABLE)) { perror("madvise MERGEABLE"); return 2; }
    for (int t = 0; t < 200 && merging() < 8; t++) usleep(20000);
    if (merging() < 8) { printf("MREMAP FAIL nothing merged (%ld)\n", merging()); return 1; }
    unsigned char *q = mremap(p, N * PS, 2 * N * PS, MREMAP_MAYMOVE);
    if (q == MAP_FAILED) { perror("MREMAP FAIL mremap"); return 1; }
    if (q == p) { printf("MREMAP FAIL did not move\n"); return 1; }
    for (unsigned long i = 0; i < N; i++)
        for (unsigned long b = 0; b < PS; b++)
            if (q[i * PS + b] != ((i / 2) % 2 ? (unsigned char)(i | 1) : 7)) { printf("MREMAP FAIL byte %lu of page %lu\n", b, i); return 1; }
    for (unsigned long b = N * PS; b < 2 * N * PS; b++)
        if (q[b]) { printf("MREMAP FAIL the grown tail is not zero\n"); return 1; }
    /* A merge at the new address maps its store page, then gives it the
     * advice: a mapping caught in between shows without it. Only a loss
     * still there a moment later counts. */
    int seen;
    if (!flags_kept((unsigned long)q, N * PS, &seen)) {
        usleep(200000);
        if (!flags_kept((unsigned long)q, N * PS, &seen) && check_advice) return 1;
    }
    if (seen < 1) { printf("MREMAP FAIL no mapping at the new address\n"); return 1; }
    q[3] = 1;
    printf("MREMAP OK (%d mappings moved)\n", seen);
    return 0;
}
