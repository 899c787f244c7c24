/* Locked memory under KSM, driven through /sys/kernel/mm/ksm the way
 * programs written for the kernel do (TWINPAGE_REDIRECT_SYSFS=1 under
 * twinpage): 64 equal pages locked, with mlock(2) ("mlock") or with
 * mlockall(MCL_CURRENT | MCL_FUTURE) first ("mlockall", as QEMU's
 * -overcommit mem-lock=on), marked mergeable, three full scans: all 64
 * merge, a write reads back, every mapping of the range stays locked
 * ("munlock": unlocked again before the write, none is locked after), and
 * the process stays small (whatever KSM maps for itself is not locked in
 * whole); after run=2 the same.
 * Prints one deterministic line per step; "MLOCK DONE" at the end. Needs
 * root (the tunables, and locking memory). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ksmfiles.h"

#define PS 4096
#define PAGES 64

/* A field of /proc/self/status, in kB. */
static long status_kb(const char *field) {
    char line[256];
    long v = -1;
    FILE *f = fopen("/proc/self/status", "r");
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, field, strlen(field))) v = strtol(line + strlen(field) + 1, NULL, 10);
    if (f) fclose(f);
    return v;
}

/* How many mappings of [a, a+len) are locked ("lo" in their VmFlags), out
 * of how many (*total). */
static int locked_mappings(unsigned char *a, size_t len, int *total) {
    char line[512];
    unsigned long s, e, lo = (unsigned long)a, hi = lo + len;
    int in = 0, locked = 0;
    *total = 0;
    FILE *f = fopen("/proc/self/smaps", "r");
    while (f && fgets(line, sizeof line, f)) {
        if (sscanf(line, "%lx-%lx ", &s, &e) == 2 && strchr(line, '-') < strchr(line, ' ')) in = s < hi && e > lo;
        else if (in && !strncmp(line, "VmFlags:", 8)) {
            ++*total;
            if (strstr(line, " lo")) locked++;
        }
    }
    if (f) fclose(f);
    return locked;
}

/* "every mapping of it locked", or with munlocked set "no mapping of it
 * locked": yes or no. */
static void print_locked(unsigned char *a, size_t len, int munlocked) {
    int total, locked = locked_mappings(a, len, &total);
    if (munlocked) printf("no mapping of it locked: %s\n", total && !locked ? "yes" : "no");
    else printf("every mapping of it locked: %s\n", total && locked == total ? "yes" : "no");
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int all = argc > 1 && !strcmp(argv[1], "mlockall");
    int unlock = argc > 1 && !strcmp(argv[1], "munlock");
    int run = open("/sys/kernel/mm/ksm/run", O_RDWR), scans = open("/sys/kernel/mm/ksm/full_scans", O_RDONLY);
    int merging = open("/proc/self/ksm_merging_pages", O_RDONLY);
    int pts = open("/sys/kernel/mm/ksm/pages_to_scan", O_WRONLY), sleep = open("/sys/kernel/mm/ksm/sleep_millisecs", O_WRONLY);
    if (run < 0 || scans < 0 || merging < 0 || write(run, "2", 1) != 1 || write(pts, "10000", 5) != 5 || write(sleep, "0", 1) != 1) {
        printf("SETUP FAIL\n");
        return 2;
    }
    if (all) printf("mlockall: %d\n", mlockall(MCL_CURRENT | MCL_FUTURE));
    size_t len = (size_t)PAGES * PS;
    unsigned char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(m, 0x5a, len);
    if (!all) printf("mlock: %d\n", mlock(m, len));
    printf("madvise: %d\n", madvise(m, len, MADV_MERGEABLE));
    printf("run=1: %zd\n", write(run, "1", 1));
    printf("three full scans: %d\n", wait_scans(scans, 3));
    printf("ksm_merging_pages: %ld\n", read_fd(merging));
    if (unlock) printf("munlock: %d\n", munlock(m, len));
    m[5 * PS] = 1;
    int good = 1;
    for (size_t i = 0; i < len; i++)
        if (m[i] != (i == 5 * PS ? 1 : 0x5a)) good = 0;
    printf("content after a write: %s\n", good ? "ok" : "WRONG");
    print_locked(m, len, unlock);
    printf("resident under 64 MiB: %s\n", status_kb("VmRSS:") < 64 * 1024 ? "yes" : "no");
    printf("run=2: %zd\n", write(run, "2", 1));
    printf("ksm_merging_pages: %ld\n", read_fd(merging));
    good = 1;
    for (size_t i = 0; i < len; i++)
        if (m[i] != (i == 5 * PS ? 1 : 0x5a)) good = 0;
    printf("content after run=2: %s\n", good ? "ok" : "WRONG");
    print_locked(m, len, unlock);
    printf("MLOCK DONE\n");
    return 0;
}
