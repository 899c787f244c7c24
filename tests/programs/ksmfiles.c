/* Drives KSM through /sys/kernel/mm/ksm and /proc/self/ksm_* the way
 * programs written for the kernel do (the kernel's selftests among them):
 * long-lived fds read with pread at offset 0, one-byte writes, full_scans
 * as the barrier after run=1, run=2 to unmerge, and stdio for one-off
 * reads and writes. Prints one deterministic line per step, so that the
 * output on kernel KSM and on twinpage (TWINPAGE_REDIRECT_SYSFS=1) can be
 * compared line by line; "KSMFILES DONE" at the end. Needs the right to
 * write the tunables (root on the kernel). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "ksmfiles.h"

#define PS 4096
#define PAGES 64

static long read_path(const char *path) {
    FILE *f = fopen(path, "r");
    long v = -1;
    if (!f) return -errno;
    if (fscanf(f, "%ld", &v) != 1) v = -1;
    fclose(f);
    return v;
}

/* "ksm_zero_pages N" of /proc/self/ksm_stat, read through a long-lived fd. */
static long stat_zero_pages(int fd) {
    char buf[512];
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *at = strstr(buf, "ksm_zero_pages ");
    return at ? strtol(at + strlen("ksm_zero_pages "), NULL, 10) : -1;
}

static const char *wr(int fd, const char *s) {
    static char res[32];
    ssize_t n = write(fd, s, strlen(s));
    if (n < 0) snprintf(res, sizeof res, "-1 %s", strerrorname_np(errno));
    else snprintf(res, sizeof res, "%zd", n);
    return res;
}

static const char *stdio_write(const char *path, const char *s) {
    static char res[32];
    FILE *f = fopen(path, "w");
    if (!f) { snprintf(res, sizeof res, "fopen %s", strerrorname_np(errno)); return res; }
    fputs(s, f);
    errno = 0;
    int r = fclose(f);
    snprintf(res, sizeof res, "%d %s", r, r ? strerrorname_np(errno) : "-");
    return res;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *K = "/sys/kernel/mm/ksm/";
    char p[256];
#define PATH(name) (snprintf(p, sizeof p, "%s%s", K, name), p)
    /* The kernel's ksm_tests looks for the directory before anything else. */
    printf("access %s: %d\n", K, access(K, F_OK));
    int run = open(PATH("run"), O_RDWR);
    int scans = open(PATH("full_scans"), O_RDONLY);
    int pts = open(PATH("pages_to_scan"), O_RDWR);
    int merging = open("/proc/self/ksm_merging_pages", O_RDONLY);
    if (run < 0 || scans < 0 || pts < 0 || merging < 0) { printf("OPEN FAIL %s\n", strerror(errno)); return 2; }
    printf("open full_scans O_RDWR: %s\n", open(PATH("full_scans"), O_RDWR) < 0 ? strerrorname_np(errno) : "ok");

    printf("run=2: %s\n", wr(run, "2"));
    printf("full_scans after run=2: %ld\n", read_fd(scans));
    printf("pages_to_scan=bogus: %s\n", wr(pts, "bogus"));
    printf("pages_to_scan=-1: %s\n", wr(pts, "-1"));
    const char *r = wr(pts, "1000");
    printf("pages_to_scan=1000: %s, reads %ld\n", r, read_fd(pts));
    r = stdio_write(PATH("sleep_millisecs"), "0");
    printf("stdio sleep_millisecs=0: %s, reads %ld\n", r, read_path(PATH("sleep_millisecs")));
    printf("stdio sleep_millisecs=x: %s\n", stdio_write(PATH("sleep_millisecs"), "x"));

    unsigned char *m = mmap(NULL, PAGES * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(m, 0xab, PAGES * PS);
    printf("madvise: %d\n", madvise(m, PAGES * PS, MADV_MERGEABLE));
    printf("ksm_merging_pages before run=1: %ld\n", read_fd(merging));
    printf("run=1: %s\n", wr(run, "1"));
    printf("two full scans: %d\n", wait_scans(scans, 2));
    printf("ksm_merging_pages: %ld\n", read_fd(merging));
    printf("pages_shared %ld pages_sharing %ld\n", read_path(PATH("pages_shared")), read_path(PATH("pages_sharing")));
    printf("run=2: %s\n", wr(run, "2"));
    printf("after run=2: ksm_merging_pages %ld full_scans %ld pages_sharing %ld\n", read_fd(merging), read_fd(scans),
           read_path(PATH("pages_sharing")));
    ssize_t n = pwrite(run, "1", 1, 7);
    printf("pwrite run=1 at offset 7: %zd, run reads %ld\n", n, read_fd(run));
    printf("two full scans: %d\n", wait_scans(scans, 2));
    printf("ksm_merging_pages again: %ld\n", read_fd(merging));
    for (int i = 0; i < PAGES * PS; i++)
        if (m[i] != 0xab) { printf("DATA FAIL at %d\n", i); return 1; }
    /* Zero pages under use_zero_pages=1: counted once merged, and no longer
     * the moment each is written (the kernel counts at the write fault). */
    int stat = open("/proc/self/ksm_stat", O_RDONLY);
    r = stdio_write(PATH("use_zero_pages"), "1");
    printf("use_zero_pages=1: %s\n", r);
    unsigned char *z = mmap(NULL, 16 * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(z, 0, 16 * PS);
    printf("madvise zeros: %d\n", madvise(z, 16 * PS, MADV_MERGEABLE));
    /* Three: kernel KSM itself once left 1 of these 16 for a later pass
     * after two (CI, a loaded machine: a page whose count is raised for an
     * instant, by the per-CPU LRU batch its fault put it in, fails
     * write_protect_page's check and waits for the next pass). */
    printf("three full scans: %d\n", wait_scans(scans, 3));
    printf("ksm_zero_pages merged: %ld\n", stat_zero_pages(stat));
    for (int i = 0; i < 16; i++) z[i * PS] = 1;
    printf("ksm_zero_pages right after writing them: %ld\n", stat_zero_pages(stat));
    printf("run=2: %s\n", wr(run, "2"));
    r = stdio_write(PATH("use_zero_pages"), "0");
    printf("use_zero_pages=0: %s\n", r);
    printf("KSMFILES DONE\n");
    return 0;
}
