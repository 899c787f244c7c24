/* What the programs that drive KSM through its files share: a value read
 * through a long-lived fd (pread at offset 0, as sysfs readers do), and
 * full_scans as the barrier. */
#ifndef KSMFILES_H
#define KSMFILES_H
#include <stdlib.h>
#include <unistd.h>

static long read_fd(int fd) {
    char buf[64];
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    if (n <= 0) return -1;
    buf[n] = 0;
    return strtol(buf, NULL, 10);
}

/* Waits (at most a minute) for full_scans, read through fd, to grow by n. */
static int wait_scans(int fd, long n) {
    long start = read_fd(fd);
    for (int i = 0; i < 60000; i++) {
        if (read_fd(fd) >= start + n) return 1;
        usleep(1000);
    }
    return 0;
}
#endif
