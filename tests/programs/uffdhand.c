/* Memory the program hands to its own userfaultfd (as QEMU's background
 * snapshot and postcopy do) and then makes unmergeable or unmaps: when the
 * userfaultfd lets go, nothing of it merges again, as on the kernel, where
 * MADV_UNMERGEABLE and munmap leave no VM_MERGEABLE behind.
 *
 * uffdhand unmergeable: 64 pages of 0xcf merged with MADV_MERGEABLE,
 * registered with the program's userfaultfd, MADV_UNMERGEABLE, the
 * userfaultfd closed: after two full scans only the 16 pages of 0x5a
 * merged beside them from the start (which keep ksmd scanning: the kernel
 * stops counting full scans of a process with nothing mergeable) merge.
 * uffdhand unmapped: the same, but the pages are unmapped and fresh memory
 * of 0xcf is mapped at the same address (never madvised) before the close.
 * Prints what merges at each step, then "HAND DONE"; the kernel is the
 * oracle (tests/kernel_oracle.rs runs it on both).
 *
 * Run with TWINPAGE_REDIRECT_SYSFS=1 under twinpage, or on the kernel. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "ksmfiles.h"
#define PS 4096
#define PAGES 64
#define KEPT 16

int main(int argc, char **argv) {
    int unmapped = argc > 1 && strcmp(argv[1], "unmapped") == 0;
    int scans = open("/sys/kernel/mm/ksm/full_scans", O_RDONLY);
    int merging = open("/proc/self/ksm_merging_pages", O_RDONLY);
    int run = open("/sys/kernel/mm/ksm/run", O_WRONLY);
    if (scans < 0 || merging < 0 || run < 0 || write(run, "1", 1) != 1) { perror("ksm files"); return 2; }
    char *m = mmap(NULL, PAGES * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { perror("mmap"); return 2; }
    char *kept = mmap(NULL, KEPT * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (kept == MAP_FAILED) { perror("mmap"); return 2; }
    memset(m, 0xcf, PAGES * PS);
    memset(kept, 0x5a, KEPT * PS);
    if (madvise(m, PAGES * PS, MADV_MERGEABLE) || madvise(kept, KEPT * PS, MADV_MERGEABLE)) { perror("madvise"); return 2; }
    if (!wait_scans(scans, 2)) { printf("no full scans\n"); return 1; }
    printf("merging at first: %ld\n", read_fd(merging));

    int uffd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    struct uffdio_api api = { .api = UFFD_API };
    if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api)) { perror("userfaultfd"); return 2; }
    struct uffdio_register reg = { .range = { (unsigned long)m, PAGES * PS }, .mode = UFFDIO_REGISTER_MODE_MISSING };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg)) { perror("UFFDIO_REGISTER"); return 2; }
    if (unmapped) {
        if (munmap(m, PAGES * PS)) { perror("munmap"); return 2; }
        char *again = mmap(m, PAGES * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (again != m) { printf("HAND FAIL the address was not free again\n"); return 2; }
        memset(m, 0xcf, PAGES * PS);
    } else if (madvise(m, PAGES * PS, MADV_UNMERGEABLE)) {
        perror("MADV_UNMERGEABLE");
        return 2;
    }
    close(uffd);
    if (!wait_scans(scans, 2)) { printf("no full scans\n"); return 1; }
    printf("merging after the userfaultfd let go: %ld\n", read_fd(merging));
    int bad = -1;
    for (int i = 0; i < PAGES * PS && bad < 0; i++)
        if ((unsigned char)m[i] != 0xcf) bad = i;
    printf("first byte changed: %d\n", bad);
    printf("HAND DONE\n");
    return 0;
}
