/* Real tasks in the states the /proc scanner looks for.
 *
 *   procscan_block vfork            parent blocks in vfork() (state D) while the child pauses
 *   procscan_block vfork-thread     a second thread blocks in vfork(); the main thread pauses
 *   procscan_block fifo-read PATH   blocks opening the fifo PATH for reading (run it as `runc`)
 *   procscan_block fifo-init PATH   names itself runc:[2:INIT], holds PATH as an O_PATH fd and
 *                                   blocks opening it for writing through /proc/self/fd/N,
 *                                   as runc's init does
 *   procscan_block fifo-hold PATH   names itself runc:[2:INIT], holds PATH as an O_PATH fd, pauses
 *   procscan_block threads N        starts N sleeping threads with small stacks, then pauses
 *   procscan_block churn RATE SECS  forks RATE short-lived children per second for SECS seconds
 *
 * Every mode prints one line once in place (the tid of the blocking task where there is one,
 * else "ready"), so a test can poll for it instead of sleeping. Children die with the parent.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void announce(long value) {
    printf("%ld\n", value);
    fflush(stdout);
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

/* The vfork child shares the parent's memory and must not return: it only makes syscalls. */
static void vfork_and_wait(void) {
    announce((long)syscall(SYS_gettid));
    pid_t child = vfork();
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        for (;;)
            pause();
    }
    if (child < 0)
        die("vfork");
}

static void *vfork_thread(void *unused) {
    (void)unused;
    vfork_and_wait();
    return NULL;
}

static void *sleeper(void *unused) {
    (void)unused;
    for (;;)
        pause();
    return NULL;
}

static void set_init_name(void) {
    if (prctl(PR_SET_NAME, "runc:[2:INIT]") != 0)
        die("prctl");
}

static int hold_fifo(const char *path) {
    int fd = open(path, O_PATH | O_CLOEXEC);
    if (fd < 0)
        die("open O_PATH");
    return fd;
}

static void start_threads(long count) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 16384);
    for (long i = 0; i < count; i++) {
        pthread_t t;
        int err = pthread_create(&t, &attr, sleeper, NULL);
        if (err != 0) {
            fprintf(stderr, "pthread_create %ld: %s\n", i, strerror(err));
            exit(2);
        }
    }
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Children live about 2 ms, so scans find some of them alive and lose others mid-read. */
static void churn(long rate, long seconds) {
    long spawned = 0;
    double start = now_seconds();
    announce(0);
    while (now_seconds() - start < (double)seconds) {
        long due = (long)((now_seconds() - start) * (double)rate);
        while (spawned < due) {
            pid_t child = fork();
            if (child == 0) {
                usleep(2000);
                _exit(0);
            }
            if (child > 0)
                spawned++;
            while (waitpid(-1, NULL, WNOHANG) > 0) {
            }
        }
        usleep(500);
    }
    while (wait(NULL) > 0) {
    }
    printf("spawned %ld\n", spawned);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: see the comment at the top of procscan_block.c\n");
        return 2;
    }
    const char *mode = argv[1];
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (strcmp(mode, "vfork") == 0) {
        vfork_and_wait();
        return 0;
    }
    if (strcmp(mode, "vfork-thread") == 0) {
        pthread_t t;
        if (pthread_create(&t, NULL, vfork_thread, NULL) != 0)
            die("pthread_create");
        for (;;)
            pause();
    }
    if (argc < 3) {
        fprintf(stderr, "%s needs an argument\n", mode);
        return 2;
    }
    if (strcmp(mode, "fifo-read") == 0) {
        announce((long)getpid());
        if (open(argv[2], O_RDONLY | O_CLOEXEC) < 0)
            die("open for reading");
        return 0;
    }
    if (strcmp(mode, "fifo-init") == 0) {
        char reopen[64];
        set_init_name();
        snprintf(reopen, sizeof reopen, "/proc/self/fd/%d", hold_fifo(argv[2]));
        announce((long)getpid());
        if (open(reopen, O_WRONLY | O_CLOEXEC) < 0)
            die("open for writing");
        return 0;
    }
    if (strcmp(mode, "fifo-hold") == 0) {
        set_init_name();
        hold_fifo(argv[2]);
        announce((long)getpid());
        for (;;)
            pause();
    }
    if (strcmp(mode, "threads") == 0) {
        start_threads(atol(argv[2]));
        announce(0);
        for (;;)
            pause();
    }
    if (strcmp(mode, "churn") == 0 && argc >= 4) {
        churn(atol(argv[2]), atol(argv[3]));
        return 0;
    }
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
