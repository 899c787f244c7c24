/* A fork while another thread's write to /sys/kernel/mm/ksm/run is still
 * waiting for the other processes of the stats tree to take it (run with
 * TWINPAGE_REDIRECT_SYSFS=1 and a stopped process on the same tree, which
 * makes that wait last): the child must be able to exit. "forkwrite idle"
 * opens the file (so that the process is on the tree), prints "READY" and
 * sleeps. "forkwrite" writes run=1 in a thread, forks 1 s later, and gives
 * the child 3 s to exit(0); prints "FORKWRITE OK", or "FORKWRITE FAIL" when
 * the child hung (it is then killed). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int run_fd;

static void *writer(void *arg) {
    (void)arg;
    ssize_t n = write(run_fd, "1", 1);
    if (n != 1) printf("write run=1: %zd\n", n);
    return NULL;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    run_fd = open("/sys/kernel/mm/ksm/run", O_RDWR);
    if (run_fd < 0) { printf("OPEN FAIL\n"); return 2; }
    if (argc > 1 && !strcmp(argv[1], "idle")) {
        printf("READY\n");
        for (;;) pause();
    }
    pthread_t t;
    if (pthread_create(&t, NULL, writer, NULL)) { printf("THREAD FAIL\n"); return 2; }
    usleep(1000 * 1000);
    pid_t child = fork();
    if (child == 0) exit(0);
    int status = 0, exited = 0;
    for (int i = 0; i < 300 && !exited; i++) {
        if (waitpid(child, &status, WNOHANG) == child) exited = 1;
        else usleep(10 * 1000);
    }
    if (!exited) {
        kill(child, SIGKILL);
        waitpid(child, &status, 0);
    }
    pthread_join(t, NULL);
    printf(exited ? "FORKWRITE OK\n" : "FORKWRITE FAIL child hung at exit\n");
    return exited ? 0 : 1;
}
