/* bench/pingpong.c — what a wakeup round trip costs on this machine.
 *
 *   pingpong CPU_A CPU_B [ROUNDS]
 *
 * Two processes, pinned to CPU_A and CPU_B, pass one byte back and forth
 * through two pipes ROUNDS times (default 20000), each sleeping in read()
 * while the other works; prints the mean microseconds per round trip.  A
 * FUSE request is the same pattern (the reader sleeps, a daemon thread
 * wakes and answers), so this is the floor under every FUSE round trip: on
 * one CPU it is two context switches, across CPUs two wakeups of a CPU that
 * may have gone idle (on a VM whose idle vCPUs halt at once, an exit to the
 * host each). */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0) {
        perror("sched_setaffinity");
        exit(1);
    }
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: pingpong CPU_A CPU_B [ROUNDS]\n");
        return 2;
    }
    int rounds = argc > 3 ? atoi(argv[3]) : 20000;
    int there[2], back[2];
    char byte = 'x';
    if (rounds <= 0 || pipe(there) != 0 || pipe(back) != 0) {
        perror("pipe");
        return 1;
    }
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 1;
    }
    if (child == 0) {
        pin(atoi(argv[2]));
        for (int i = 0; i < rounds; i++)
            if (read(there[0], &byte, 1) != 1 || write(back[1], &byte, 1) != 1)
                _exit(1);
        _exit(0);
    }
    pin(atoi(argv[1]));
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < rounds; i++)
        if (write(there[1], &byte, 1) != 1 || read(back[0], &byte, 1) != 1) {
            fprintf(stderr, "pingpong: pipe broke\n");
            return 1;
        }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    int status;
    waitpid(child, &status, 0);
    double us = ((t1.tv_sec - t0.tv_sec) * 1e6 + (t1.tv_nsec - t0.tv_nsec) / 1e3) / rounds;
    printf("%.2f\n", us);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
