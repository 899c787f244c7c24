/*
 * twinpage guest workload: fills anonymous memory with a known mix of
 * duplicate and unique pages, waits while the host merges them, then checks
 * that every page still holds what was written, rewrites some pages (single
 * words and whole pages, which forces copy-on-write of merged pages on the
 * host) and checks again.
 *
 * Built static (gcc -static -O2) by scripts/guest-image.sh and run by the
 * guest's /init with the tp.* parameters of the kernel command line as
 * arguments ("tp.mib=64", "mib=64" and "--mib=64" are all accepted).
 *
 * Console protocol (one line each, stdout, flushed):
 *   TP-START <params>
 *   TP-READY pages=N dup_pages=D
 *   TP-INFO ...                       details (counts, timings, uptime)
 *   TP-VERIFY round=K ok              after each successful verification
 *   TP-REWRITE round=K pages=R words=W unique=U pattern=P
 *   TP-BAD round=K page=P kind=... want=... got=... w0=...   (first few)
 *   TP-ODIRECT start|reads=N lost=L corrupt=C errors=E     (tp.odirect > 0)
 *   TP-ODIRECT-BAD thread=T buf=B block=K kind=lost|corrupt w0=...  (first few)
 *   TP-VERDICT OK | TP-VERDICT FAIL page=P round=K bad_pages=N
 *   TP-IDLE | TP-POWEROFF
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / 8u)
#define MAX_BAD_REPORT 8

enum kind { K_UNIQUE = 0, K_DUP = 1, K_ZERO = 2 };
static const char *kind_name[] = {"unique", "dup", "zero"};

struct params {
    long mib, dup, zero, patterns, wait, rewrite, settle, seed;
    long loop, rounds, interval, looprewrite, poweroff, thp;
    long odirect, odthreads;
};

static struct params P = {
    .mib = 128, .dup = 50, .zero = 0, .patterns = 16, .wait = 20,
    .rewrite = 10, .settle = 2, .seed = 1, .loop = 0, .rounds = 0,
    .interval = 5, .looprewrite = 0, .poweroff = 0, .thp = 0,
    .odirect = 0, .odthreads = 4,
};

static const struct { const char *name; long *val; long min, max; } PARAMS[] = {
    {"mib", &P.mib, 1, 1 << 20},        {"dup", &P.dup, 0, 100},
    {"zero", &P.zero, 0, 100},          {"patterns", &P.patterns, 1, 1 << 20},
    {"wait", &P.wait, 0, 1L << 30},     {"rewrite", &P.rewrite, 0, 100},
    {"settle", &P.settle, 0, 1L << 30}, {"seed", &P.seed, 0, 1L << 62},
    {"loop", &P.loop, 0, 1},            {"rounds", &P.rounds, 0, 1L << 62},
    {"interval", &P.interval, 0, 1L << 30},
    {"looprewrite", &P.looprewrite, 0, 100},
    {"poweroff", &P.poweroff, 0, 1},    {"thp", &P.thp, 0, 1},
    {"odirect", &P.odirect, 0, 1L << 30}, {"odthreads", &P.odthreads, 1, 64},
};

static uint8_t *buf;
static uint8_t *kinds;
static uint64_t *sums;
static uint64_t npages, dup_pages, zero_pages, unique_pages;

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27; x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static uint64_t key3(uint64_t a, uint64_t b, uint64_t c)
{
    return mix64(mix64(mix64((uint64_t)P.seed ^ 0x7470ULL) ^ a) ^ b) ^ c;
}

static uint64_t checksum(const void *page)
{
    const uint64_t *w = page;
    uint64_t h = 0x6a09e667f3bcc909ULL;
    for (unsigned j = 0; j < WORDS; j++) {
        h = (h ^ w[j]) * 0x9e3779b97f4a7c15ULL;
        h ^= h >> 29;
    }
    return mix64(h);
}

static void fill_random(uint64_t *w, uint64_t key)
{
    uint64_t s = mix64(key) | 1;
    for (unsigned j = 0; j < WORDS; j++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        w[j] = s;
    }
}

/* Pattern page p: random content with a recognisable first word. */
static void make_pattern(uint64_t *w, uint64_t p)
{
    fill_random(w, key3(1, p, 0));
    w[0] = 0x7470706174000000ULL | (p & 0xffffff); /* "tppat" */
}

/* Unique page i, generation g: page index and generation in the first words. */
static void make_unique(uint64_t *w, uint64_t i, uint64_t g)
{
    fill_random(w, key3(2, i, g));
    w[0] = i;
    w[1] = g;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double uptime_s(void)
{
    double up = -1;
    FILE *f = fopen("/proc/uptime", "r");
    if (f) {
        if (fscanf(f, "%lf", &up) != 1) up = -1;
        fclose(f);
    }
    return up;
}

static void sleep_s(long s)
{
    struct timespec ts = {.tv_sec = s, .tv_nsec = 0};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

static uint64_t gcd(uint64_t a, uint64_t b)
{
    while (b) { uint64_t t = a % b; a = b; b = t; }
    return a;
}

/* A multiplier coprime to n, so i -> (i*m + off) % n is a bijection. */
static uint64_t coprime_mult(uint64_t n, uint64_t start)
{
    uint64_t m = start % n;
    if (m == 0) m = 1;
    while (gcd(m, n) != 1) m++;
    return m;
}

static void fill(void)
{
    uint64_t m = coprime_mult(npages, 2654435761ULL);
    for (uint64_t i = 0; i < npages; i++) {
        uint64_t *w = (uint64_t *)(buf + i * PAGE);
        uint64_t j = (i * m) % npages;
        if (j < zero_pages) {
            memset(w, 0, PAGE); /* touch it so the guest really has the page */
            kinds[i] = K_ZERO;
        } else if (j < zero_pages + dup_pages) {
            make_pattern(w, j % (uint64_t)P.patterns);
            kinds[i] = K_DUP;
        } else {
            make_unique(w, i, 0);
            kinds[i] = K_UNIQUE;
        }
        sums[i] = checksum(w);
    }
}

/* Returns the number of bad pages; *first gets the first bad page. */
static uint64_t verify(long round, uint64_t *first)
{
    uint64_t bad = 0;
    for (uint64_t i = 0; i < npages; i++) {
        const uint64_t *w = (const uint64_t *)(buf + i * PAGE);
        uint64_t got = checksum(w);
        if (got == sums[i]) continue;
        if (bad == 0) *first = i;
        if (bad < MAX_BAD_REPORT)
            printf("TP-BAD round=%ld page=%" PRIu64 " kind=%s want=%016" PRIx64
                   " got=%016" PRIx64 " w0=%016" PRIx64 " w1=%016" PRIx64 "\n",
                   round, i, kind_name[kinds[i]], sums[i], got, w[0], w[1]);
        bad++;
    }
    fflush(stdout);
    return bad;
}

/*
 * Rewrite pct% of the pages (an exact count, spread over the buffer), in
 * three kinds taking turns: one word changed in place, the whole page
 * replaced by new unique content, the whole page replaced by a copy of a
 * pattern page. The expected checksum is computed from a private copy, never
 * read back from the page written.
 */
static void rewrite(long round, long pct)
{
    uint64_t n = npages * (uint64_t)pct / 100, words = 0, uniq = 0, pat = 0;
    uint64_t m = coprime_mult(npages, 0x9e3779b1ULL + (uint64_t)round * 2);
    uint64_t off = key3(3, (uint64_t)round, 0) % npages;
    uint64_t tmp[WORDS];

    for (uint64_t i = 0; i < npages; i++) {
        uint64_t j = (i * m + off) % npages;
        if (j >= n) continue;
        uint64_t *w = (uint64_t *)(buf + i * PAGE);
        uint64_t r = key3(4, (uint64_t)round, i);
        switch (j % 3) {
        case 0: { /* single word */
            unsigned at = (unsigned)(r % WORDS);
            memcpy(tmp, w, PAGE);
            uint64_t v = mix64(r) | 1;
            if (v == tmp[at]) v ^= 2;
            tmp[at] = v;
            sums[i] = checksum(tmp);
            __atomic_store_n(&w[at], v, __ATOMIC_RELAXED);
            words++;
            break;
        }
        case 1: /* whole page, new unique content */
            make_unique(tmp, i, (uint64_t)round);
            sums[i] = checksum(tmp);
            memcpy(w, tmp, PAGE);
            kinds[i] = K_UNIQUE;
            uniq++;
            break;
        default: /* whole page, copy of a pattern */
            make_pattern(tmp, (j + (uint64_t)round) % (uint64_t)P.patterns);
            sums[i] = checksum(tmp);
            memcpy(w, tmp, PAGE);
            kinds[i] = K_DUP;
            pat++;
            break;
        }
    }
    printf("TP-REWRITE round=%ld pages=%" PRIu64 " words=%" PRIu64 " unique=%" PRIu64
           " pattern=%" PRIu64 "\n", round, words + uniq + pat, words, uniq, pat);
    fflush(stdout);
}

static int check(long round, uint64_t *bad_out, uint64_t *first_out)
{
    double t0 = now_s();
    uint64_t first = 0, bad = verify(round, &first);
    if (bad) {
        *bad_out = bad;
        *first_out = first;
        return 0;
    }
    printf("TP-VERIFY round=%ld ok\n", round);
    printf("TP-INFO verify round=%ld ms=%.0f uptime=%.2f\n", round,
           (now_s() - t0) * 1e3, uptime_s());
    fflush(stdout);
    return 1;
}

/*
 * O_DIRECT reader (tp.odirect=SECONDS): the scenario of a guest whose disk
 * is `cache=none` (QEMU reads with O_DIRECT straight into guest RAM, which
 * the host pins for the read). tp.odthreads threads each fill OD_BUFS
 * page-aligned buffers with one byte, so that the host can merge them,
 * sleep, then read a random disk block into every buffer with O_DIRECT and
 * check it. A read whose buffer still holds the fill byte afterwards was
 * lost: the host wrote it into a page the guest no longer had.
 *
 * Disk block b (of /dev/vda, written by the host test) holds the words
 * DISK_MAGIC | b << 16 | j, j = 0..511.
 */
#define OD_BUFS 256
#define OD_FILL 0x5a
#define OD_SLEEP_NS 40000000L
#define DISK_MAGIC 0x54504b0000000000ULL /* "TPK" */

static int od_fd = -1;
static uint64_t od_blocks;
static double od_end;
static uint64_t od_reads, od_lost, od_corrupt, od_errors, od_reported;

static void od_check(long t, unsigned b, uint64_t block, const uint64_t *w)
{
    const uint8_t *bytes = (const uint8_t *)w;
    int stale = 1, good = 1;
    for (unsigned j = 0; j < WORDS; j++)
        if (w[j] != (DISK_MAGIC | block << 16 | j)) { good = 0; break; }
    if (good) return;
    for (unsigned j = 0; j < PAGE; j++)
        if (bytes[j] != OD_FILL) { stale = 0; break; }
    __atomic_add_fetch(stale ? &od_lost : &od_corrupt, 1, __ATOMIC_RELAXED);
    if (__atomic_fetch_add(&od_reported, 1, __ATOMIC_RELAXED) < MAX_BAD_REPORT)
        printf("TP-ODIRECT-BAD thread=%ld buf=%u block=%" PRIu64 " kind=%s w0=%016" PRIx64
               " w511=%016" PRIx64 "\n", t, b, block, stale ? "lost" : "corrupt", w[0], w[WORDS - 1]);
}

static void *od_thread(void *arg)
{
    long t = (long)arg;
    size_t len = (size_t)OD_BUFS * PAGE;
    uint8_t *bufs = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (bufs == MAP_FAILED) {
        __atomic_add_fetch(&od_errors, 1, __ATOMIC_RELAXED);
        return NULL;
    }
    if (!P.thp) madvise(bufs, len, MADV_NOHUGEPAGE);
    uint64_t s = mix64((uint64_t)t + 0x6f64ULL) | 1;
    while (now_s() < od_end) {
        memset(bufs, OD_FILL, len);
        struct timespec ts = {.tv_sec = 0, .tv_nsec = OD_SLEEP_NS};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
        for (unsigned b = 0; b < OD_BUFS; b++) {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            uint64_t block = s % od_blocks;
            uint64_t *w = (uint64_t *)(bufs + (size_t)b * PAGE);
            ssize_t n = pread(od_fd, w, PAGE, (off_t)(block * PAGE));
            if (n != (ssize_t)PAGE) {
                if (__atomic_fetch_add(&od_errors, 1, __ATOMIC_RELAXED) < MAX_BAD_REPORT)
                    printf("TP-ODIRECT-ERR thread=%ld block=%" PRIu64 " ret=%zd: %s\n", t, block, n,
                           n < 0 ? strerror(errno) : "short read");
                continue;
            }
            __atomic_add_fetch(&od_reads, 1, __ATOMIC_RELAXED);
            od_check(t, b, block, w);
        }
    }
    munmap(bufs, len);
    return NULL;
}

/* Returns 1 when every read landed. */
static int odirect(void)
{
    od_fd = open("/dev/vda", O_RDONLY | O_DIRECT);
    off_t size = od_fd < 0 ? -1 : lseek(od_fd, 0, SEEK_END);
    if (size < (off_t)PAGE) {
        printf("TP-ODIRECT-ERR cannot use /dev/vda (size %jd): %s\n", (intmax_t)size, strerror(errno));
        return 0;
    }
    od_blocks = (uint64_t)size / PAGE;
    printf("TP-ODIRECT start threads=%ld blocks=%" PRIu64 " seconds=%ld uptime=%.2f\n", P.odthreads,
           od_blocks, P.odirect, uptime_s());
    fflush(stdout);
    od_end = now_s() + (double)P.odirect;
    pthread_t th[64];
    long started = 0;
    for (long t = 0; t < P.odthreads; t++)
        if (pthread_create(&th[started], NULL, od_thread, (void *)t) == 0) started++;
    for (long t = 0; t < started; t++) pthread_join(th[t], NULL);
    if (started < P.odthreads) od_errors++;
    close(od_fd);
    printf("TP-ODIRECT reads=%" PRIu64 " lost=%" PRIu64 " corrupt=%" PRIu64 " errors=%" PRIu64
           " uptime=%.2f\n", od_reads, od_lost, od_corrupt, od_errors, uptime_s());
    fflush(stdout);
    return od_lost == 0 && od_corrupt == 0 && od_errors == 0 && od_reads > 0;
}

static int parse_arg(const char *a)
{
    while (*a == '-') a++;
    if (strncmp(a, "tp.", 3) == 0) a += 3;
    const char *eq = strchr(a, '=');
    if (!eq) return 0;
    for (size_t k = 0; k < sizeof(PARAMS) / sizeof(PARAMS[0]); k++) {
        size_t len = strlen(PARAMS[k].name);
        if ((size_t)(eq - a) != len || strncmp(a, PARAMS[k].name, len) != 0) continue;
        char *end;
        errno = 0;
        long v = strtol(eq + 1, &end, 0);
        if (errno || *end || end == eq + 1 || v < PARAMS[k].min || v > PARAMS[k].max) {
            printf("TP-ERROR bad value in %s (allowed %ld..%ld)\n", a,
                   PARAMS[k].min, PARAMS[k].max);
            return -1;
        }
        *PARAMS[k].val = v;
        return 1;
    }
    return 0;
}

static int finish(int ok)
{
    fflush(stdout);
    if (P.poweroff) {
        printf("TP-POWEROFF\n");
        fflush(stdout);
        return ok ? 0 : 1; /* /init powers the guest off */
    }
    printf("TP-IDLE\n");
    fflush(stdout);
    for (;;) pause(); /* keep the buffer mapped for the host to look at */
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    setvbuf(stderr, NULL, _IONBF, 0);

    for (int k = 1; k < argc; k++) {
        int r = parse_arg(argv[k]);
        if (r < 0) return 2;
        if (r == 0) printf("TP-WARN unknown argument %s\n", argv[k]);
    }
    if (P.dup + P.zero > 100) {
        printf("TP-ERROR dup+zero must be <= 100\n");
        return 2;
    }
    printf("TP-START mib=%ld dup=%ld zero=%ld patterns=%ld wait=%ld rewrite=%ld settle=%ld"
           " seed=%ld loop=%ld rounds=%ld interval=%ld looprewrite=%ld poweroff=%ld thp=%ld"
           " odirect=%ld odthreads=%ld\n",
           P.mib, P.dup, P.zero, P.patterns, P.wait, P.rewrite, P.settle, P.seed, P.loop,
           P.rounds, P.interval, P.looprewrite, P.poweroff, P.thp, P.odirect, P.odthreads);
    fflush(stdout);

    size_t len = (size_t)P.mib << 20;
    npages = len / PAGE;
    dup_pages = npages * (uint64_t)P.dup / 100;
    zero_pages = npages * (uint64_t)P.zero / 100;
    unique_pages = npages - dup_pages - zero_pages;

    buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    kinds = calloc(npages, 1);
    sums = calloc(npages, sizeof(*sums));
    if (buf == MAP_FAILED || !kinds || !sums) {
        printf("TP-ERROR cannot allocate %ld MiB: %s\n", P.mib, strerror(errno));
        printf("TP-VERDICT FAIL page=none round=0 bad_pages=0 reason=alloc\n");
        return finish(0);
    }
    /* Without THP the guest keeps the buffer in 4 KiB pages, and khugepaged
     * does not move them around behind the host's back. */
    if (!P.thp) madvise(buf, len, MADV_NOHUGEPAGE);

    double t0 = now_s();
    fill();
    double fill_ms = (now_s() - t0) * 1e3;
    printf("TP-READY pages=%" PRIu64 " dup_pages=%" PRIu64 "\n", npages, dup_pages);
    printf("TP-INFO pages=%" PRIu64 " dup_pages=%" PRIu64 " zero_pages=%" PRIu64
           " unique_pages=%" PRIu64 " patterns=%ld fill_ms=%.0f uptime=%.2f\n",
           npages, dup_pages, zero_pages, unique_pages, P.patterns, fill_ms, uptime_s());
    fflush(stdout);

    long round = 1;
    uint64_t bad = 0, first = 0;
    sleep_s(P.wait);
    int ok = check(round, &bad, &first);
    if (ok && P.odirect && !odirect()) {
        printf("TP-VERDICT FAIL page=none round=%ld bad_pages=0 reason=odirect\n", round);
        return finish(0);
    }
    if (ok) {
        round++;
        rewrite(round, P.rewrite);
        sleep_s(P.settle);
        ok = check(round, &bad, &first);
    }
    if (!ok) {
        printf("TP-VERDICT FAIL page=%" PRIu64 " round=%ld bad_pages=%" PRIu64 "\n",
               first, round, bad);
        return finish(0);
    }
    printf("TP-VERDICT OK\n");
    fflush(stdout);

    if (P.loop) {
        long done = 0;
        while (P.rounds == 0 || done < P.rounds) {
            sleep_s(P.interval);
            round++;
            if (P.looprewrite) rewrite(round, P.looprewrite);
            if (!check(round, &bad, &first)) {
                printf("TP-VERDICT FAIL page=%" PRIu64 " round=%ld bad_pages=%" PRIu64 "\n",
                       first, round, bad);
                return finish(0);
            }
            done++;
        }
        printf("TP-INFO loop done rounds=%ld\n", done);
    }
    return finish(1);
}
