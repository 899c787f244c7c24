/* Churn: maps, unmaps, remaps, discards and rewrites registered memory
 * while twinpage merges it flat out, checking every byte against a shadow
 * copy after every operation. Prints "CHURN OK ops=N" or "CHURN FAIL ...". */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PS 4096
#define SLOTS 64
#define MAXP 64

struct slot { uint8_t *mem; uint8_t *shadow; size_t pages; };
static struct slot s[SLOTS];
static uint64_t rng = 88172645463325252ull;
static char hist[SLOTS][16][96]; static int hpos[SLOTS];
static uint64_t rnd(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

static void fill_page(uint8_t *dst, uint64_t pattern) {
    uint64_t *w = (uint64_t *)dst;
    for (int i = 0; i < PS / 8; i++) w[i] = pattern * 0x9E3779B97F4A7C15ull + i;
}

static int check(int k, const char *op, long n) {
    if (!s[k].mem) return 0;
    if (memcmp(s[k].mem, s[k].shadow, s[k].pages * PS)) {
        for (size_t p = 0; p < s[k].pages; p++)
            if (memcmp(s[k].mem + p * PS, s[k].shadow + p * PS, PS)) {
                uint64_t *a = (uint64_t *)(s[k].mem + p * PS), *b = (uint64_t *)(s[k].shadow + p * PS);
                int w = 0; while (a[w] == b[w]) w++;
                printf("CHURN FAIL op=%ld after=%s slot=%d page=%zu of %zu addr=%p word=%d got=%llx want=%llx\n", n, op, k, p, s[k].pages,
                       (void *)(s[k].mem + p * PS), w, (unsigned long long)a[w], (unsigned long long)b[w]);
                for (int h = 16; h > 0; h--) if (hpos[k] - h >= 0) printf("  hist: %s\n", hist[k][(hpos[k] - h) % 16]);
                FILE *mf = fopen("/proc/self/maps", "r"); char ln[512];
                while (mf && fgets(ln, sizeof ln, mf)) {
                    unsigned long lo, hi;
                    if (sscanf(ln, "%lx-%lx", &lo, &hi) == 2 && lo <= (unsigned long)(s[k].mem + p * PS) && hi > (unsigned long)(s[k].mem + p * PS)) printf("  maps: %s", ln);
                }
                if (mf) fclose(mf);
                return 1;
            }
    }
    return 0;
}

static void map_slot(int k) {
    size_t pages = 1 + rnd() % MAXP;
    uint8_t *m = mmap(NULL, pages * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { perror("mmap"); exit(2); }
    s[k].mem = m; s[k].pages = pages;
    s[k].shadow = realloc(s[k].shadow, pages * PS);
    for (size_t p = 0; p < pages; p++) {
        fill_page(m + p * PS, rnd() % 8); /* few patterns: many duplicates */
        memcpy(s[k].shadow + p * PS, m + p * PS, PS);
    }
    if (madvise(m, pages * PS, MADV_MERGEABLE)) { perror("madvise"); exit(2); }
}

int main(int argc, char **argv) {
    long ops = argc > 1 ? atol(argv[1]) : 100000;
    for (int k = 0; k < SLOTS; k++) map_slot(k);
    usleep(200000);
    for (long n = 0; n < ops; n++) {
        int k = rnd() % SLOTS;
        const char *op;
        switch (rnd() % 8) {
        case 0: /* unmap and map again: a new range, maybe the old address */
            op = "remap-slot";
            munmap(s[k].mem, s[k].pages * PS);
            s[k].mem = NULL;
            map_slot(k);
            break;
        case 1: { /* mremap: grow, shrink or move */
            op = "mremap";
            size_t np = 1 + rnd() % MAXP;
            uint8_t *m = mremap(s[k].mem, s[k].pages * PS, np * PS, MREMAP_MAYMOVE);
            snprintf(hist[k][hpos[k]++ % 16], 96, "   mremap %p %zu -> %p %zu", (void *)s[k].mem, s[k].pages, (void *)m, np);
            if (m == MAP_FAILED) { perror("mremap"); return 2; }
            s[k].shadow = realloc(s[k].shadow, np * PS);
            if (np > s[k].pages) memset(s[k].shadow + s[k].pages * PS, 0, (np - s[k].pages) * PS);
            s[k].mem = m; s[k].pages = np;
            break; }
        case 2: { /* discard a sub-range: reads back zeros */
            op = "dontneed";
            size_t a = rnd() % s[k].pages, l = 1 + rnd() % (s[k].pages - a);
            if (madvise(s[k].mem + a * PS, l * PS, MADV_DONTNEED)) { perror("dontneed"); return 2; }
            snprintf(hist[k][hpos[k]++ % 16], 96, "   dontneed pages %zu..%zu", a, a + l);
            memset(s[k].shadow + a * PS, 0, l * PS);
            break; }
        case 3: { /* map fresh memory over a sub-range */
            op = "mmap-fixed";
            size_t a = rnd() % s[k].pages, l = 1 + rnd() % (s[k].pages - a);
            if (mmap(s[k].mem + a * PS, l * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED) { perror("mmap fixed"); return 2; }
            memset(s[k].shadow + a * PS, 0, l * PS);
            snprintf(hist[k][hpos[k]++ % 16], 96, "   mmap-fixed pages %zu..%zu", a, a + l);
            break; }
        case 4: { /* one word */
            op = "word";
            size_t off = (rnd() % (s[k].pages * PS / 8)) * 8;
            uint64_t v = rnd();
            memcpy(s[k].mem + off, &v, 8); memcpy(s[k].shadow + off, &v, 8);
            break; }
        default: { /* whole page, from a few patterns (duplicates again) */
            op = "page";
            size_t p = rnd() % s[k].pages;
            fill_page(s[k].mem + p * PS, rnd() % 8);
            memcpy(s[k].shadow + p * PS, s[k].mem + p * PS, PS);
            break; }
        }
        snprintf(hist[k][hpos[k]++ % 16], 96, "op %ld %s mem=%p pages=%zu", n, op, (void *)s[k].mem, s[k].pages);
        if (check(k, op, n)) return 1;
        if (n % 1000 == 0) {
            for (int j = 0; j < SLOTS; j++) if (check(j, "sweep", n)) return 1;
            usleep(1000); /* let merges land between bursts */
        }
    }
    for (int j = 0; j < SLOTS; j++) if (check(j, "final", ops)) return 1;
    usleep(300000);
    char path[256], buf[64] = "";
    snprintf(path, sizeof path, "%s/proc/%d/twinpage_counters", getenv("TWINPAGE_DIR") ? getenv("TWINPAGE_DIR") : "/run/twinpage", getpid());
    FILE *f = fopen(path, "r"); char ln[256];
    while (f && fgets(ln, sizeof ln, f)) if (!strncmp(ln, "twinpage_merge_runs", 19) || !strncmp(ln, "twinpage_cow_breaks", 19)) printf("COUNTER %s", ln);
    if (f) fclose(f);
    (void)buf;
    printf("CHURN OK ops=%ld\n", ops);
    return 0;
}
