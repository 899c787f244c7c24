/* full_scans as the barrier, the way the kernel's selftests use it: run=2
 * (nothing merged, nothing scanning), N pages of one byte marked mergeable,
 * run=1, then two full scans later every page is merged, chained at
 * max_page_sharing. Prints what it reads through the files.
 *
 * barrier PAGES[n][f|c]... : one round for each page count; with `n`, the
 * pages are made PROT_NONE before they are marked (the kernel merges them
 * too); with `f`, the program forks once they are filled and the child exits
 * at once (the parent's pages stay "maybe shared" until written); with `c`,
 * the child lives on until the barrier has passed (it shares the pages);
 * with `w`, once merged, one page is written with the byte it holds, and two
 * more full scans later it is merged again (the kernel's next scan finds it
 * in the stable tree). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include "ksmfiles.h"

#define PS 4096

static long read_path(const char *p) {
    int fd = open(p, O_RDONLY);
    long v = read_fd(fd);
    close(fd);
    return v;
}

/* Whether `child` exited with status 0. */
static int exited_ok(pid_t child) {
    int st = 0;
    return waitpid(child, &st, 0) == child && WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int run = open("/sys/kernel/mm/ksm/run", O_RDWR);
    int scans = open("/sys/kernel/mm/ksm/full_scans", O_RDONLY);
    int merging = open("/proc/self/ksm_merging_pages", O_RDONLY);
    int pts = open("/sys/kernel/mm/ksm/pages_to_scan", O_WRONLY), sleep = open("/sys/kernel/mm/ksm/sleep_millisecs", O_WRONLY);
    if (run < 0 || scans < 0 || merging < 0 || pts < 0 || sleep < 0) { printf("OPEN FAIL %s\n", strerror(errno)); return 2; }
    if (write(pts, "10000", 5) != 5 || write(sleep, "0", 1) != 1) { printf("SETUP FAIL %s\n", strerror(errno)); return 2; }
    for (int a = 1; a < argc; a++) {
        size_t pages = (size_t)atol(argv[a]), len = pages * PS;
        int none = strchr(argv[a], 'n') != NULL;
        printf("run=2: %zd\n", write(run, "2", 1));
        unsigned char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(m, 0x5a + a, len);
        int lives = strchr(argv[a], 'c') != NULL, kid[2] = {-1, -1};
        pid_t child = -1;
        if (strchr(argv[a], 'f') || lives) {
            if (pipe(kid)) { printf("PIPE FAIL %s\n", strerror(errno)); return 2; }
            child = fork();
            if (child == 0) {
                char c;
                close(kid[1]);
                if (lives) (void)!read(kid[0], &c, 1); /* until the parent closes it */
                _exit(m[len - 1] == 0x5a + a ? 0 : 1);
            }
            close(kid[0]);
            if (!lives) {
                close(kid[1]);
                printf("child exited: %d\n", exited_ok(child));
            }
        }
        if (none) printf("mprotect none: %d\n", mprotect(m, len, PROT_NONE));
        printf("%zu pages, madvise: %d\n", pages, madvise(m, len, MADV_MERGEABLE));
        printf("run=1: %zd\n", write(run, "1", 1));
        printf("two full scans: %d\n", wait_scans(scans, 2));
        printf("ksm_merging_pages: %ld\n", read_fd(merging));
        printf("pages_shared %ld pages_sharing %ld\n", read_path("/sys/kernel/mm/ksm/pages_shared"),
               read_path("/sys/kernel/mm/ksm/pages_sharing"));
        if (strchr(argv[a], 'w')) {
            *(volatile unsigned char *)(m + PS) = 0x5a + a;
            printf("rewritten, two full scans: %d\n", wait_scans(scans, 2));
            printf("ksm_merging_pages: %ld\n", read_fd(merging));
        }
        if (lives) {
            close(kid[1]);
            printf("child saw its pages: %d\n", exited_ok(child));
        }
        munmap(m, len);
    }
    printf("run=2: %zd\n", write(run, "2", 1));
    printf("BARRIER DONE\n");
    return 0;
}
