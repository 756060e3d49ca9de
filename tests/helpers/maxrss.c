/* maxrss DEADLINE_SECONDS PROGRAM ARGS...: run PROGRAM in a child forked from this small
 * process and print "exit=<code> maxrss_kib=<peak RSS>" from the child's own rusage. A child
 * spawned straight from the test process would inherit the test's peak RSS through vfork. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: maxrss DEADLINE_SECONDS PROGRAM ARGS...\n");
        return 2;
    }
    int deadline = atoi(argv[1]);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return 2;
    }
    if (pid == 0) {
        execv(argv[2], argv + 2);
        perror("execv");
        _exit(127);
    }
    time_t start = time(NULL);
    int status = 0;
    struct rusage usage;
    for (;;) {
        pid_t reaped = wait4(pid, &status, WNOHANG, &usage);
        if (reaped == pid)
            break;
        if (time(NULL) - start > deadline) {
            kill(pid, SIGKILL);
            wait4(pid, &status, 0, &usage);
            printf("timeout maxrss_kib=%ld\n", usage.ru_maxrss);
            return 3;
        }
        usleep(5000);
    }
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    printf("exit=%d maxrss_kib=%ld\n", code, usage.ru_maxrss);
    return 0;
}
