/* A process that only calls prctl(PR_SET_MEMORY_MERGE, 1): its private
 * anonymous memory is merged, before and after the call. Prints the
 * PR_GET_MEMORY_MERGE value, then "PRCTL OK" once its memory verifies.
 *
 * prctl forkexec SECS: sets merge-any, maps memory, forks; the child maps
 * memory too, then execs this program (prctl SECS), which must find
 * merge-any still on and its memory merged, as ksm_functional_tests'
 * test_prctl_fork_exec expects. Prints "FORKEXEC status=N" at the end.
 *
 * prctl count PAGES SECS [BYTE]: sets merge-any, maps PAGES pages of 0xcf
 * (or BYTE; -1: every page different), prints
 * "READY", sleeps SECS and exits: what ksm_functional_tests' test_prctl
 * counts (pages_shared 1, pages_sharing PAGES-1 on the kernel).
 *
 * prctl again PAGES SECS: madvises PAGES pages of 0xcf mergeable and waits
 * (at most SECS) until some merge, turns merge-any on and off again (which
 * unmerges everything), then does the same with fresh memory: what
 * ksm_functional_tests does from test_prctl to its last test. Prints
 * "AGAIN OK" when the second range merged, "AGAIN FAIL ..." otherwise.
 *
 * prctl split PAGES SECS: madvises PAGES pages mergeable, every other one
 * of 0x5a and the rest all different (merging maps each merged page on its
 * own, so the range becomes a mapping a page), waits (at most SECS) until
 * the equal ones merge, then turns merge-any on and off. Prints
 * "SPLIT OK mappings=N" with the mappings counted before the prctl.
 *
 * prctl own PAGES SECS: madvises PAGES equal pages mergeable and waits (at
 * most SECS) until they merge (twinpage's records of them are then a large
 * heap block of equal pages), turns merge-any on, and checks that every
 * mapping registered with a userfaultfd (smaps `uw`) lies in its own
 * memory (its own mappings besides that are a few pages of libc's and the
 * loader's: a new registration of 32 pages or more outside it is not the
 * program's); then writes every page and turns merge-any off. Prints
 * "OWN OK", or "OWN FAIL" with the first mapping registered outside it. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>
#define PS 4096
#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#define PR_GET_MEMORY_MERGE 68
#endif

static uint8_t *area(size_t pages) {
    uint8_t *m = mmap(NULL, pages * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { perror("mmap"); exit(2); }
    for (size_t p = 0; p < pages; p++) memset(m + p * PS, 0x40 + (int)(p % 4), PS);
    return m;
}

static int fork_exec(const char *secs) {
    if (prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0)) { perror("prctl"); return 2; }
    area(256);
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) { perror("fork"); return 2; }
    if (pid == 0) {
        area(16);
        execl("/proc/self/exe", "prctl", secs, (char *)NULL);
        perror("exec");
        _exit(2);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    printf("FORKEXEC status=%d\n", WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    return 0;
}

static int count(size_t pages, int secs, int byte) {
    if (prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0)) { perror("prctl"); return 2; }
    uint8_t *m = mmap(NULL, pages * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { perror("mmap"); return 2; }
    /* BYTE -1: every page different (its index in every word), nothing to merge. */
    for (size_t p = 0; p < pages; p++)
        for (size_t w = 0; w < PS / 8; w++)
            ((uint64_t *)(m + p * PS))[w] = byte < 0 ? (uint64_t)p * 0x9E3779B97F4A7C15ull + w : 0x0101010101010101ull * (uint8_t)byte;
    printf("READY\n");
    fflush(stdout);
    sleep(secs);
    for (size_t p = 0; p < pages; p++)
        for (size_t w = 0; w < PS / 8; w++)
            if (((uint64_t *)(m + p * PS))[w] != (byte < 0 ? (uint64_t)p * 0x9E3779B97F4A7C15ull + w : 0x0101010101010101ull * (uint8_t)byte)) {
                printf("COUNT FAIL at page %zu\n", p);
                return 1;
            }
    printf("COUNT OK\n");
    return 0;
}

/* This process's ksm_merging_pages in twinpage's tree (-1: unreadable). */
static long merging_pages(void) {
    char path[4096], buf[64] = "";
    snprintf(path, sizeof path, "%s/proc/%d/ksm_merging_pages", getenv("TWINPAGE_DIR") ? getenv("TWINPAGE_DIR") : "/run/twinpage", getpid());
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    if (!fgets(buf, sizeof buf, f)) buf[0] = 0;
    fclose(f);
    return buf[0] ? atol(buf) : -1;
}

/* Maps PAGES pages of 0xcf, madvises them mergeable and waits at most SECS
 * for some to merge. */
static uint8_t *merge_fresh(size_t pages, int secs) {
    uint8_t *m = mmap(NULL, pages * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { perror("mmap"); exit(2); }
    memset(m, 0xcf, pages * PS);
    if (madvise(m, pages * PS, MADV_MERGEABLE)) { perror("madvise"); exit(2); }
    for (int i = 0; i < secs * 20; i++) {
        if (merging_pages() > 0) return m;
        usleep(50000);
    }
    return NULL;
}

/* Writes page P's first byte (P) in each of PAGES pages of 0xcf and checks
 * every byte: first writes of merged pages, copied by the fault thread. */
static int write_and_check(uint8_t *m, size_t pages) {
    for (size_t p = 0; p < pages; p++) m[p * PS] = (uint8_t)p;
    for (size_t p = 0; p < pages; p++)
        for (size_t i = 0; i < PS; i++)
            if (m[p * PS + i] != (i ? 0xcf : (uint8_t)p)) return 0;
    return 1;
}

static int again(size_t pages, int secs) {
    uint8_t *a = merge_fresh(pages, secs);
    if (!a) { printf("AGAIN FAIL first range never merged\n"); return 1; }
    a[0] = 0; /* a first write: twinpage's copy pool is there from now on */
    if (prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0)) { perror("prctl"); return 2; }
    sleep(1);
    if (!write_and_check(a, pages)) { printf("AGAIN FAIL first writes under merge-any\n"); return 1; }
    if (prctl(PR_SET_MEMORY_MERGE, 0, 0, 0, 0)) { perror("prctl"); return 2; }
    for (int i = 0; i < secs * 20 && merging_pages() != 0; i++) usleep(50000);
    if (merging_pages() != 0) { printf("AGAIN FAIL merge-any off left %ld merging\n", merging_pages()); return 1; }
    if (!merge_fresh(pages, secs)) { printf("AGAIN FAIL second range never merged\n"); return 1; }
    printf("AGAIN OK\n");
    return 0;
}

/* The mappings of this process now. */
static long mappings(void) {
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f) return -1;
    long n = 0;
    for (int c; (c = fgetc(f)) != EOF;) n += c == '\n';
    fclose(f);
    return n;
}

static int split(size_t pages, int secs) {
    uint8_t *m = mmap(NULL, pages * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { perror("mmap"); return 2; }
    for (size_t p = 0; p < pages; p++)
        for (size_t w = 0; w < PS / 8; w++)
            ((uint64_t *)(m + p * PS))[w] = p % 2 ? p * 0x9E3779B97F4A7C15ull + w : 0x5a5a5a5a5a5a5a5aull;
    if (madvise(m, pages * PS, MADV_MERGEABLE)) { perror("madvise"); return 2; }
    long want = (long)(pages / 2);
    for (int i = 0; i < secs * 20 && merging_pages() < want; i++) usleep(50000);
    if (merging_pages() < want) { printf("SPLIT FAIL %ld of %ld pages merged\n", merging_pages(), want); return 1; }
    long n = mappings();
    if (prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) || prctl(PR_SET_MEMORY_MERGE, 0, 0, 0, 0)) { perror("prctl"); return 2; }
    printf("SPLIT OK mappings=%ld\n", n);
    return 0;
}

/* The mappings registered with a userfaultfd (smaps `uw`) outside
 * [lo, hi), at most max of them, into out; returns how many. */
static int registered_outside(unsigned long lo, unsigned long hi, unsigned long (*out)[2], int max) {
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) { perror("smaps"); exit(2); }
    char line[512];
    unsigned long a = 0, b = 0;
    int n = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long x, y;
        char c;
        if (sscanf(line, "%lx-%lx%c", &x, &y, &c) == 3 && c == ' ')
            a = x, b = y;
        else if (!strncmp(line, "VmFlags:", 8) && strstr(line, " uw") && (a < lo || b > hi) && n < max)
            out[n][0] = a, out[n][1] = b, n++;
    }
    fclose(f);
    return n;
}

static int own(size_t pages, int secs) {
    uint8_t *m = mmap(NULL, pages * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { perror("mmap"); return 2; }
    memset(m, 0x5a, pages * PS);
    if (madvise(m, pages * PS, MADV_MERGEABLE)) { perror("madvise"); return 2; }
    for (int i = 0; i < secs * 20 && merging_pages() < (long)pages; i++) usleep(50000);
    if (merging_pages() < (long)pages) { printf("OWN FAIL %ld of %zu pages merged\n", merging_pages(), pages); return 1; }
    /* twinpage's own registrations (its pin check's scratch mapping) are
     * there before merge-any; merge-any must add none outside m. */
    static unsigned long before[64][2], after[64][2];
    unsigned long lo = (unsigned long)m, hi = lo + pages * PS;
    int nb = registered_outside(lo, hi, before, 64);
    if (prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0)) { perror("prctl"); return 2; }
    int na = registered_outside(lo, hi, after, 64);
    for (int i = 0; i < na; i++) {
        int known = 0;
        for (int j = 0; j < nb; j++) known |= after[i][0] == before[j][0] && after[i][1] == before[j][1];
        /* Besides m this program has only libc's and the loader's few
         * pages: a larger mapping registered now is not its memory. */
        if (!known && after[i][1] - after[i][0] >= 32 * PS) { printf("OWN FAIL %lx-%lx registered outside the program's memory %lx-%lx\n", after[i][0], after[i][1], lo, hi); return 1; }
    }
    for (size_t p = 0; p < pages; p++) m[p * PS] = (uint8_t)p;
    for (size_t p = 0; p < pages; p++)
        if (m[p * PS] != (uint8_t)p || m[p * PS + 1] != 0x5a) { printf("OWN FAIL page %zu\n", p); return 1; }
    if (prctl(PR_SET_MEMORY_MERGE, 0, 0, 0, 0)) { perror("prctl"); return 2; }
    printf("OWN OK\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 3 && strcmp(argv[1], "own") == 0) return own((size_t)atol(argv[2]), atoi(argv[3]));
    if (argc > 3 && strcmp(argv[1], "split") == 0) return split((size_t)atol(argv[2]), atoi(argv[3]));
    if (argc > 3 && strcmp(argv[1], "again") == 0) return again((size_t)atol(argv[2]), atoi(argv[3]));
    if (argc > 2 && strcmp(argv[1], "forkexec") == 0) return fork_exec(argv[2]);
    if (argc > 3 && strcmp(argv[1], "count") == 0)
        return count((size_t)atol(argv[2]), atoi(argv[3]), argc > 4 ? (int)strtol(argv[4], NULL, 0) : 0xcf);
    int secs = argc > 1 ? atoi(argv[1]) : 5;
    size_t pages = 2048;
    uint8_t *before = area(pages);
    printf("GET_BEFORE %d\n", prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0));
    if (prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0)) { perror("prctl"); return 2; }
    printf("GET_AFTER %d\n", prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0));
    printf("BAD_ARGS %d\n", prctl(PR_SET_MEMORY_MERGE, 1, 1, 0, 0));
    uint8_t *after = area(pages);
    fflush(stdout);
    sleep(secs);
    for (size_t p = 0; p < pages; p++)
        for (size_t i = 0; i < PS; i++)
            if (before[p * PS + i] != 0x40 + (int)(p % 4) || after[p * PS + i] != 0x40 + (int)(p % 4)) {
                printf("PRCTL FAIL page=%zu\n", p);
                return 1;
            }
    char path[4096], buf[64] = "";
    snprintf(path, sizeof path, "%s/proc/%d/ksm_merging_pages", getenv("TWINPAGE_DIR") ? getenv("TWINPAGE_DIR") : "/run/twinpage", getpid());
    FILE *f = fopen(path, "r");
    if (f) { if (!fgets(buf, sizeof buf, f)) buf[0] = 0; fclose(f); }
    if (!buf[0]) printf("MISSING_PATH %s\n", path);
    printf("MERGING_PAGES %s", buf[0] ? buf : "missing\n");
    printf("PRCTL OK\n");
    return 0;
}
