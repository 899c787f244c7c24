/* Reads this process's own pages_scanned, through the file the preload
 * serves for /sys/kernel/mm/ksm/pages_scanned (TWINPAGE_REDIRECT_SYSFS=1:
 * this process's engine, exact at the read), once per line on stdin, and
 * prints it. Its PAGES pages are all different (nothing merges; the
 * scanner keeps scanning). Prints "READY" once registered.
 * usage: scanread PAGES */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define PS 4096

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: scanread PAGES\n"); return 2; }
    size_t pages = strtoull(argv[1], 0, 0);
    uint64_t *mem = mmap(0, pages * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { perror("scanread: mmap"); return 2; }
    for (size_t i = 0; i < pages * PS / 8; i++) mem[i] = i * 0x9E3779B97F4A7C15ull + 1;
    if (madvise(mem, pages * PS, MADV_MERGEABLE)) { perror("scanread: madvise"); return 2; }
    int fd = open("/sys/kernel/mm/ksm/pages_scanned", O_RDONLY);
    if (fd < 0) { perror("scanread: open pages_scanned"); return 2; }
    printf("READY\n");
    fflush(stdout);
    char line[64], buf[64];
    while (fgets(line, sizeof line, stdin)) {
        ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
        if (n <= 0) { perror("scanread: pread"); return 1; }
        buf[n] = 0;
        printf("%s", buf);
        fflush(stdout);
    }
    return 0;
}
