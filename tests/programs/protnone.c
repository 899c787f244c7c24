/* PROT_NONE memory under KSM, driven through /sys/kernel/mm/ksm and
 * /proc/self the way programs written for the kernel do: memory filled,
 * made PROT_NONE, marked mergeable, two full scans as the barrier; then
 * written through /proc/self/mem (which may write what the program cannot),
 * half of it unmerged with MADV_UNMERGEABLE, and its protection changed
 * back and forth. Prints one deterministic line per step, compared line by
 * line between kernel KSM and twinpage (TWINPAGE_REDIRECT_SYSFS=1);
 * "PROTNONE DONE" at the end. Needs root (the tunables, and the PFNs of
 * /proc/self/pagemap). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ksmfiles.h"

#define PS 4096
#define PAGES 512

/* How many pages of [m, m+pages) share their frame with another, once
 * each is faulted in by a read through /proc/self/mem. */
static int shared_frames(unsigned char *m, int pages) {
    int mem = open("/proc/self/mem", O_RDONLY);
    for (int i = 0; i < pages; i++) {
        char c;
        if (pread(mem, &c, 1, (uintptr_t)(m + (size_t)i * PS)) != 1) return -1;
    }
    close(mem);
    int fd = open("/proc/self/pagemap", O_RDONLY);
    uint64_t *pfn = calloc(pages, sizeof *pfn);
    int dups = 0;
    for (int i = 0; i < pages; i++) {
        uint64_t e = 0;
        if (pread(fd, &e, 8, (uintptr_t)(m + (size_t)i * PS) / PS * 8) != 8) { dups = -1; break; }
        pfn[i] = (e >> 63) & 1 ? e & ((1ULL << 55) - 1) : 0;
    }
    for (int i = 0; dups >= 0 && i < pages; i++)
        for (int j = 0; pfn[i] && j < i; j++)
            if (pfn[j] == pfn[i]) { dups++; break; }
    free(pfn);
    close(fd);
    return dups;
}

/* Whether page i reads back as expected: its index in the first `unique`
 * pages, else `fill` bytes. Read through /proc/self/mem when PROT_NONE. */
static int content_ok(int mem, unsigned char *m, int pages, int unique, int fill) {
    unsigned char buf[PS];
    for (int i = 0; i < pages; i++) {
        if (pread(mem, buf, PS, (uintptr_t)(m + (size_t)i * PS)) != PS) return 0;
        for (int k = 0; k < PS; k++) {
            int want = fill;
            if (i < unique && k < (int)sizeof(int)) want = ((unsigned char *)&i)[k];
            if (buf[k] != want) return 0;
        }
    }
    return 1;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int run = open("/sys/kernel/mm/ksm/run", O_RDWR);
    int scans = open("/sys/kernel/mm/ksm/full_scans", O_RDONLY);
    int merging = open("/proc/self/ksm_merging_pages", O_RDONLY);
    int mem = open("/proc/self/mem", O_RDWR);
    if (run < 0 || scans < 0 || merging < 0 || mem < 0) { printf("OPEN FAIL %s\n", strerror(errno)); return 2; }
    int pts = open("/sys/kernel/mm/ksm/pages_to_scan", O_WRONLY), sleep = open("/sys/kernel/mm/ksm/sleep_millisecs", O_WRONLY);
    if (write(run, "2", 1) != 1 || write(pts, "10000", 5) != 5 || write(sleep, "0", 1) != 1) {
        printf("SETUP FAIL %s\n", strerror(errno));
        return 2;
    }

    size_t len = (size_t)PAGES * PS;
    unsigned char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(m, 0x11, len);
    printf("mprotect none: %d\n", mprotect(m, len, PROT_NONE));
    printf("madvise: %d\n", madvise(m, len, MADV_MERGEABLE));
    printf("run=1: %zd\n", write(run, "1", 1));
    printf("two full scans: %d\n", wait_scans(scans, 2));
    printf("ksm_merging_pages: %ld\n", read_fd(merging));
    printf("pages sharing a frame: %d\n", shared_frames(m, PAGES));

    /* A unique value into each page of the first half, as a debugger would. */
    int wrote = 0;
    for (int i = 0; i < PAGES / 2; i++)
        if (pwrite(mem, &i, sizeof i, (uintptr_t)(m + (size_t)i * PS)) == sizeof i) wrote++;
        else if (wrote == i) printf("write %d: %s\n", i, strerror(errno));
    printf("written through /proc/self/mem: %d\n", wrote);
    printf("madvise unmergeable second half: %d\n", madvise(m + len / 2, len / 2, MADV_UNMERGEABLE));
    printf("pages sharing a frame: %d\n", shared_frames(m, PAGES));
    printf("content: %s\n", content_ok(mem, m, PAGES, PAGES / 2, 0x11) ? "ok" : "WRONG");
    /* Pages written behind KSM's back leave the count at its next scan (on
     * the kernel as here): read it after the barrier, not before. */
    printf("two full scans: %d\n", wait_scans(scans, 2));
    printf("ksm_merging_pages: %ld\n", read_fd(merging));

    /* Merged readable memory made PROT_NONE and back: the content stays. */
    unsigned char *r = mmap(NULL, 64 * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(r, 0x22, 64 * PS);
    printf("madvise: %d\n", madvise(r, 64 * PS, MADV_MERGEABLE));
    printf("two full scans: %d\n", wait_scans(scans, 2));
    printf("merged: %s\n", shared_frames(r, 64) == 63 ? "all" : "not all");
    /* The kernel keeps merged pages merged across mprotect; twinpage unmerges
     * the range and merges it again: a scan under way, one for checksums,
     * one to merge. */
    printf("mprotect none: %d\n", mprotect(r, 64 * PS, PROT_NONE));
    printf("three full scans: %d\n", wait_scans(scans, 3));
    printf("merged: %s\n", shared_frames(r, 64) == 63 ? "all" : "not all");
    printf("mprotect rw: %d\n", mprotect(r, 64 * PS, PROT_READ | PROT_WRITE));
    r[5 * PS] = 0x33;
    int good = r[5 * PS] == 0x33;
    for (int i = 0; i < 64 * PS; i++)
        if (i != 5 * PS && r[i] != 0x22) good = 0;
    printf("content after a write: %s\n", good ? "ok" : "WRONG");
    printf("three full scans: %d\n", wait_scans(scans, 3));
    printf("pages sharing a frame: %d\n", shared_frames(r, 64));
    printf("run=2: %zd\n", write(run, "2", 1));
    printf("PROTNONE DONE\n");
    return 0;
}
