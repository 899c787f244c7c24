/* mprotect of merged memory: PROT_NONE (the scanner must stay away), back to
 * read-only and read-write; every byte keeps its value. Prints MPROTECT OK. */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
int main() {
    size_t ps = 4096, n = 64;
    unsigned char *p = mmap(NULL, n*ps, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
    memset(p, 9, n*ps);
    madvise(p, n*ps, MADV_MERGEABLE);
    usleep(300000);
    if (mprotect(p, n*ps, PROT_NONE)) { perror("mprotect"); return 1; }
    usleep(300000);                      /* the scanner must not touch it now */
    if (mprotect(p, n*ps, PROT_READ)) { perror("mprotect"); return 1; }
    usleep(300000);
    for (size_t i = 0; i < n*ps; i++) if (p[i] != 9) { printf("BAD %zu\n", i); return 1; }
    if (mprotect(p, n*ps, PROT_READ|PROT_WRITE)) { perror("mprotect"); return 1; }
    p[5*ps] = 1;
    printf("MPROTECT OK\n");
    return 0;
}
