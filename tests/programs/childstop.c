/* One process's run=2 unmerges every process's pages before write(2)
 * returns, as the kernel's does (ksm_functional_tests'
 * test_fork_global_ksm_zero_pages_count: a forked child writes run=2 and
 * exits, and the parent's counters must show nothing merged at once).
 * The parent maps 64 equal pages and 32 pages of zeros, madvises them
 * mergeable, writes run=1 and waits for two full scans; a forked child
 * writes run=2 and exits; the parent then reads its counters without
 * waiting. Run with TWINPAGE_REDIRECT_SYSFS=1 under twinpage, or on the
 * kernel (as root). Prints the counters at each step, then "CHILDSTOP DONE". */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include "ksmfiles.h"
#define PS 4096
#define SAME 64

static int write_file(const char *path, const char *v) {
    int fd = open(path, O_RDWR);
    if (fd < 0) return -1;
    ssize_t n = write(fd, v, strlen(v));
    close(fd);
    return n == (ssize_t)strlen(v) ? 0 : -1;
}

static long read_path(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    long v = read_fd(fd);
    close(fd);
    return v;
}

static void show(const char *when) {
    printf("%s: merging %ld, zero pages %ld\n", when, read_path("/proc/self/ksm_merging_pages"),
           read_path("/sys/kernel/mm/ksm/ksm_zero_pages"));
}

int main(void) {
    if (write_file("/sys/kernel/mm/ksm/run", "2") || write_file("/sys/kernel/mm/ksm/use_zero_pages", "1")) {
        perror("ksm files");
        return 2;
    }
    char *m = mmap(NULL, (SAME + 32) * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { perror("mmap"); return 2; }
    memset(m, 0x5a, (size_t)SAME * PS);
    memset(m + (size_t)SAME * PS, 0, 32 * PS);
    if (madvise(m, (SAME + 32) * PS, MADV_MERGEABLE)) { perror("madvise"); return 2; }
    int scans = open("/sys/kernel/mm/ksm/full_scans", O_RDONLY);
    if (scans < 0 || write_file("/sys/kernel/mm/ksm/run", "1") || !wait_scans(scans, 2)) { printf("no full scans\n"); return 1; }
    show("merged");
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) { perror("fork"); return 2; }
    if (pid == 0) _exit(write_file("/sys/kernel/mm/ksm/run", "2") ? 1 : 0);
    int status = 0;
    waitpid(pid, &status, 0);
    printf("child's run=2: %s\n", WIFEXITED(status) && WEXITSTATUS(status) == 0 ? "written" : "failed");
    show("at once after it");
    for (int i = 0; i < SAME + 32; i++)
        if (m[(size_t)i * PS] != (i < SAME ? 0x5a : 0)) { printf("page %d changed\n", i); return 1; }
    write_file("/sys/kernel/mm/ksm/use_zero_pages", "0");
    printf("CHILDSTOP DONE\n");
    return 0;
}
