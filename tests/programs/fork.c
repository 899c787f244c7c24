/* fork after merging: the parent rewrites every page (its sharing breaks and
 * the store pages are freed) while the child checks that its inherited copy
 * still holds the original content. Prints FORK OK. */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#define PS 4096
#define N 256
int main(void) {
    unsigned char *p = mmap(NULL, N * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < N; i++) memset(p + i * PS, 0x20 + i % 4, PS);
    if (madvise(p, N * PS, MADV_MERGEABLE)) { perror("madvise"); return 2; }
    usleep(500000);
    pid_t child = fork();
    if (child < 0) { perror("fork"); return 2; }
    if (child == 0) {
        usleep(500000); /* the parent breaks all its sharing meanwhile */
        for (int i = 0; i < N; i++)
            for (int j = 0; j < PS; j++)
                if (p[i * PS + j] != 0x20 + i % 4) { printf("CHILD BAD page=%d byte=%d got=%d\n", i, j, p[i * PS + j]); fflush(stdout); _exit(1); }
        _exit(0);
    }
    for (int i = 0; i < N; i++) memset(p + i * PS, 0x70, PS);
    usleep(300000); /* the scanner sees the breaks and frees store pages */
    int st;
    waitpid(child, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st)) { printf("FORK FAIL\n"); return 1; }
    printf("FORK OK\n");
    return 0;
}
