/* A process that only calls prctl(PR_SET_MEMORY_MERGE, 1): its private
 * anonymous memory is merged, before and after the call. Prints the
 * PR_GET_MEMORY_MERGE value, then "PRCTL OK" once its memory verifies. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
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

int main(int argc, char **argv) {
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
    char path[64], buf[64] = "";
    snprintf(path, sizeof path, "%s/proc/%d/ksm_merging_pages", getenv("TWINPAGE_DIR") ? getenv("TWINPAGE_DIR") : "/run/twinpage", getpid());
    FILE *f = fopen(path, "r");
    if (f) { if (!fgets(buf, sizeof buf, f)) buf[0] = 0; fclose(f); }
    printf("MERGING_PAGES %s", buf[0] ? buf : "missing\n");
    printf("PRCTL OK\n");
    return 0;
}
