/* Direct reads into mergeable memory, while twinpage merges flat out.
 *
 * Writes FILE (BLOCKS distinct 4 KiB blocks, none equal to the buffer's
 * pattern), maps PAGES anonymous pages all holding one pattern (so they are
 * duplicates: merge candidates), marks them mergeable, then runs THREADS
 * readers for SECONDS. Each reader loops over its own pages: write the
 * pattern back (the page is a duplicate again; if it was merged, this is
 * its first write since; three readers in four discard the page first,
 * so they meet the check on fresh pages more often), wait a little (so the scanner may merge it
 * meanwhile), read one block into it with O_DIRECT (MODE odirect: pread;
 * MODE uring: IORING_OP_READ through a raw io_uring; MODE fixed:
 * IORING_OP_READ_FIXED into the reader's pages, registered with the ring
 * once with IORING_REGISTER_BUFFERS, which pins them for the ring's life
 * as VFIO pins guest RAM) and check that the page holds exactly that block. A page still holding
 * the pattern after its read returned is a lost write: the device wrote into
 * a physical page that no longer backs the address.
 *
 * Prints "PINNED reads=R mismatches=M lost=L", the process's
 * twinpage counters as "COUNTER name value" lines, and exits 0 when M is 0.
 * Exit 3: io_uring unavailable (MODE uring). BACKING is anon (default) or
 * memfd: the pages are then a private mapping of a memfd, as QEMU's
 * memory-backend-file with share=off. usage:
 * pinned MODE SECONDS FILE PAGES THREADS [BACKING] */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PS 4096
#define BLOCKS 256

static int use_uring, use_fixed;
static int dfd;
static uint8_t *buf, *pattern, *blocks;
static size_t npages, nthreads;
static double deadline;
static atomic_ulong reads, mismatches, lost;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fill(uint8_t *p, uint64_t seed) {
    uint64_t *w = (uint64_t *)p;
    for (int i = 0; i < PS / 8; i++) w[i] = seed * 0x9E3779B97F4A7C15ull + i + 1;
}

struct ring {
    int fd;
    unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
};

static int ring_init(struct ring *r) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    r->fd = syscall(__NR_io_uring_setup, 4, &p);
    if (r->fd < 0) return -1;
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    uint8_t *sq = mmap(0, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQ_RING);
    uint8_t *cq = mmap(0, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_CQ_RING);
    r->sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   r->fd, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || r->sqes == MAP_FAILED) return -1;
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    return 0;
}

/* One IORING_OP_READ of a block into dst (IORING_OP_READ_FIXED of
 * registered buffer `fixed` when it is >= 0), waited for; bytes read or
 * -errno. */
static int ring_read(struct ring *r, void *dst, off_t off, int fixed) {
    unsigned tail = *r->sq_tail, idx = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = &r->sqes[idx];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = fixed >= 0 ? IORING_OP_READ_FIXED : IORING_OP_READ;
    if (fixed >= 0) sqe->buf_index = (unsigned short)fixed;
    sqe->fd = dfd;
    sqe->addr = (uintptr_t)dst;
    sqe->len = PS;
    sqe->off = off;
    r->sq_array[idx] = idx;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    for (;;) {
        int ret = syscall(__NR_io_uring_enter, r->fd, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0);
        if (ret >= 0 || errno != EINTR) break;
    }
    for (;;) {
        unsigned head = *r->cq_head;
        if (head != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) {
            int res = r->cqes[head & *r->cq_mask].res;
            __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
            return res;
        }
        syscall(__NR_io_uring_enter, r->fd, 0, 1, IORING_ENTER_GETEVENTS, NULL, 0);
    }
}

static void *reader(void *arg) {
    size_t t = (size_t)arg;
    struct ring r;
    if (use_uring && ring_init(&r)) { perror("pinned: io_uring"); exit(2); }
    if (use_fixed) {
        struct iovec iov[1024];
        unsigned n = 0;
        for (size_t p = t; p < npages && n < 1024; p += nthreads, n++) iov[n] = (struct iovec){buf + p * PS, PS};
        if (syscall(__NR_io_uring_register, r.fd, IORING_REGISTER_BUFFERS, iov, n)) { perror("pinned: IORING_REGISTER_BUFFERS"); exit(2); }
    }
    uint64_t rng = 0x2545F4914F6CDD1Dull ^ (t * 0x9E3779B97F4A7C15ull);
    while (now() < deadline) {
        for (size_t p = t; p < npages && now() < deadline; p += nthreads) {
            uint8_t *dst = buf + p * PS;
            if (t % 4 != 3 && !use_fixed && madvise(dst, PS, MADV_DONTNEED)) { perror("pinned: madvise(DONTNEED)"); exit(2); }
            memcpy(dst, pattern, PS);
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            /* Up to 1 ms: the scanner passes over the pages about that often. */
            struct timespec ts = {0, (long)(rng % 1000) * 1000};
            nanosleep(&ts, 0);
            unsigned b = (rng >> 20) % BLOCKS;
            int fixed = use_fixed ? (int)((p - t) / nthreads) : -1;
            long n = use_uring ? ring_read(&r, dst, (off_t)b * PS, fixed) : pread(dfd, dst, PS, (off_t)b * PS);
            if (n != PS) { fprintf(stderr, "pinned: read returned %ld (%s)\n", n, strerror(n < 0 ? (int)-n : errno)); exit(2); }
            atomic_fetch_add(&reads, 1);
            if (memcmp(dst, blocks + (size_t)b * PS, PS)) {
                int was_pattern = !memcmp(dst, pattern, PS);
                if (atomic_fetch_add(&mismatches, 1) < 5)
                    fprintf(stderr, "pinned: page %zu after reading block %u holds %s\n", p, b,
                            was_pattern ? "its old content (lost write)" : "something else");
                if (was_pattern) atomic_fetch_add(&lost, 1);
            }
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 6 && argc != 7) { fprintf(stderr, "usage: pinned odirect|uring|fixed SECONDS FILE PAGES THREADS [anon|memfd]\n"); return 2; }
    use_fixed = !strcmp(argv[1], "fixed");
    use_uring = use_fixed || !strcmp(argv[1], "uring");
    double secs = atof(argv[2]);
    npages = strtoul(argv[4], 0, 0);
    nthreads = strtoul(argv[5], 0, 0);
    if (!nthreads || npages < nthreads) { fprintf(stderr, "pinned: need PAGES >= THREADS >= 1\n"); return 2; }
    if (use_uring) {
        struct ring probe;
        if (ring_init(&probe)) { printf("NO_URING %s\n", strerror(errno)); return 3; }
        close(probe.fd);
    }

    blocks = aligned_alloc(PS, (size_t)BLOCKS * PS);
    pattern = aligned_alloc(PS, PS);
    fill(pattern, 0xA5A5);
    for (unsigned b = 0; b < BLOCKS; b++) fill(blocks + (size_t)b * PS, 1000 + b);
    int wfd = open(argv[3], O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (wfd < 0 || write(wfd, blocks, (size_t)BLOCKS * PS) != (ssize_t)BLOCKS * PS || fsync(wfd)) {
        perror("pinned: writing the file"); return 2;
    }
    close(wfd);
    dfd = open(argv[3], O_RDONLY | O_DIRECT);
    if (dfd < 0) { perror("pinned: O_DIRECT open"); return 2; }

    int mfd = -1;
    if (argc > 6 && !strcmp(argv[6], "memfd")) {
        mfd = memfd_create("pinned-ram", MFD_CLOEXEC);
        if (mfd < 0 || ftruncate(mfd, (off_t)(npages * PS))) { perror("pinned: memfd"); return 2; }
    } else if (argc > 6 && strcmp(argv[6], "anon")) {
        fprintf(stderr, "pinned: BACKING is anon or memfd\n"); return 2;
    }
    buf = mmap(0, npages * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | (mfd < 0 ? MAP_ANONYMOUS : 0), mfd, 0);
    if (buf == MAP_FAILED) { perror("pinned: mmap"); return 2; }
    for (size_t p = 0; p < npages; p++) memcpy(buf + p * PS, pattern, PS);
    if (madvise(buf, npages * PS, MADV_MERGEABLE)) { perror("pinned: madvise"); return 2; }

    deadline = now() + secs;
    pthread_t th[64];
    if (nthreads > 64) nthreads = 64;
    for (size_t t = 0; t < nthreads; t++) pthread_create(&th[t], 0, reader, (void *)t);
    for (size_t t = 0; t < nthreads; t++) pthread_join(th[t], 0);

    printf("PINNED reads=%lu mismatches=%lu lost=%lu\n", reads, mismatches, lost);
    char path[512], ln[256];
    /* Give the engine one publishing period to write its last counters. */
    usleep(300 * 1000);
    snprintf(path, sizeof path, "%s/proc/%d/twinpage_counters", getenv("TWINPAGE_DIR") ? getenv("TWINPAGE_DIR") : "/run/twinpage", getpid());
    FILE *f = fopen(path, "r");
    while (f && fgets(ln, sizeof ln, f)) printf("COUNTER %s", ln);
    if (f) fclose(f);
    unlink(argv[3]);
    return mismatches ? 1 : 0;
}
