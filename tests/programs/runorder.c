/* Writes to /sys/kernel/mm/ksm/run from two processes, in the order
 * ksm_functional_tests makes them (test_prctl, then test_prctl_fork), run
 * with TWINPAGE_REDIRECT_SYSFS=1: the parent sets merge-any, maps 64 equal
 * pages, starts KSM (run=1) and waits for two full scans, unmerges
 * (run=2), then forks at once; the child maps 64 equal pages, writes
 * run=1 and waits (at most 10 s) for two full scans, as vm_util's
 * ksm_start does. On the kernel run is one value, so the child's write,
 * made after the parent's, stands. Prints "RUNORDER OK", or "RUNORDER
 * FAIL" with what the child saw. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#define PS 4096
#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#endif

static long read_long(const char *path) {
    char buf[64] = {0};
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    close(fd);
    return n > 0 ? strtol(buf, NULL, 10) : -1;
}

static int write_run(const char *v) {
    int fd = open("/sys/kernel/mm/ksm/run", O_RDWR);
    if (fd < 0) return -1;
    ssize_t n = write(fd, v, strlen(v));
    close(fd);
    return n == (ssize_t)strlen(v) ? 0 : -1;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* run=1 and two full scans, within 10 s. */
static int start(void) {
    long s0 = read_long("/sys/kernel/mm/ksm/full_scans");
    if (s0 < 0 || write_run("1")) return -1;
    double t0 = now();
    while (read_long("/sys/kernel/mm/ksm/full_scans") < s0 + 2) {
        if (now() - t0 > 10) return 1;
        usleep(1000);
    }
    return 0;
}

static void area(int byte) {
    char *m = mmap(NULL, 64 * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { perror("mmap"); exit(2); }
    memset(m, byte, 64 * PS);
}

int main(void) {
    if (prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0)) { perror("prctl"); return 2; }
    area(0xcf);
    if (start()) { printf("RUNORDER FAIL parent: no two full scans\n"); return 1; }
    if (write_run("2")) { printf("RUNORDER FAIL parent: run=2 refused\n"); return 1; }
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        area(0xab);
        int r = start();
        printf("child: start %d, run %ld, full_scans %ld\n", r, read_long("/sys/kernel/mm/ksm/run"),
               read_long("/sys/kernel/mm/ksm/full_scans"));
        fflush(stdout);
        _exit(r == 0 ? 0 : 1);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) < 0) { perror("fork"); return 2; }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        printf("RUNORDER FAIL the child's run=1 did not stand (status %d)\n", status);
        return 1;
    }
    printf("RUNORDER OK\n");
    return 0;
}
