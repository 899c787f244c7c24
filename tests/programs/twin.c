/* A process whose pages twin another's: maps COMMON pages filled from SEED
 * (the same in every process started with the same seed) and PAIRS pairs of
 * pages private to this process (both pages of a pair equal, unlike anything
 * else), marks them mergeable, prints "READY", then keeps checking every
 * byte against what it wrote and rewrites one page every 20 ms (so sharing
 * keeps breaking and forming) unless WRITES is 0. SIGTERM/SIGINT: final
 * check, then "VERIFY OK pages=N writes=W" (exit 0) or "VERIFY FAIL ..."
 * (exit 1). usage: twin SEED COMMON PAIRS WRITES(0|1) */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PS 4096
static volatile sig_atomic_t stop;
static void on_signal(int s) { (void)s; stop = 1; }

static void fill_page(uint8_t *dst, uint64_t pattern) {
    uint64_t *w = (uint64_t *)dst;
    for (int i = 0; i < PS / 8; i++) w[i] = pattern * 0x9E3779B97F4A7C15ull + i;
}

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: twin SEED COMMON PAIRS WRITES\n"); return 2; }
    int do_writes = atoi(argv[4]);
    uint64_t seed = strtoull(argv[1], 0, 0);
    size_t common = strtoull(argv[2], 0, 0), pairs = strtoull(argv[3], 0, 0);
    size_t pages = common + 2 * pairs;
    uint8_t *mem = mmap(0, pages * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint8_t *shadow = malloc(pages * PS);
    if (mem == MAP_FAILED || !shadow) { perror("twin: mmap"); return 2; }
    uint64_t own = ((uint64_t)getpid() << 32) ^ 0x5eed;
    for (size_t p = 0; p < pages; p++) {
        uint64_t pattern = p < common ? seed * 1000003 + p : own + (p - common) / 2;
        fill_page(shadow + p * PS, pattern);
    }
    memcpy(mem, shadow, pages * PS);
    if (madvise(mem, pages * PS, MADV_MERGEABLE)) { perror("twin: madvise"); return 2; }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    printf("READY pid=%d pages=%zu\n", getpid(), pages);
    fflush(stdout);
    uint64_t writes = 0, rng = seed ^ own;
    while (!stop) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, 0);
        if (memcmp(mem, shadow, pages * PS)) break;
        if (!do_writes) continue;
        /* Rewrite one page with content it had or new content. */
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
        size_t p = rng % pages;
        fill_page(shadow + p * PS, (rng & 1) ? rng : (p < common ? seed * 1000003 + p : own + (p - common) / 2));
        memcpy(mem + p * PS, shadow + p * PS, PS);
        writes++;
        if (memcmp(mem, shadow, pages * PS)) break;
    }
    for (size_t p = 0; p < pages; p++)
        if (memcmp(mem + p * PS, shadow + p * PS, PS)) {
            printf("VERIFY FAIL page=%zu of %zu writes=%llu\n", p, pages, (unsigned long long)writes);
            return 1;
        }
    printf("VERIFY OK pages=%zu writes=%llu\n", pages, (unsigned long long)writes);
    return 0;
}
