/* The floor for the /proc scanner's hot loop: open and read every /proc/<pid>/task/<tid>/stat
 * and nothing else, the way the scanner does (readdir, openat relative to the directory, one
 * read into a fixed buffer).
 *
 *   procscan_floor ITERATIONS
 *
 * prints one line per iteration: "<nanoseconds> <stat files read>".
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* "<name><suffix>" into out, without printf. */
static const char *join(char *out, const char *name, const char *suffix) {
    size_t n = strlen(name), s = strlen(suffix);
    memcpy(out, name, n);
    memcpy(out + n, suffix, s + 1);
    return out;
}

static long scan(void) {
    static char buf[4096];
    char path[64];
    long read_count = 0;
    DIR *proc = opendir("/proc");
    if (proc == NULL)
        return -1;
    struct dirent *pe;
    while ((pe = readdir(proc)) != NULL) {
        if (pe->d_name[0] < '0' || pe->d_name[0] > '9')
            continue;
        int task_fd = openat(dirfd(proc), join(path, pe->d_name, "/task"),
                             O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (task_fd < 0)
            continue;
        DIR *tasks = fdopendir(task_fd);
        if (tasks == NULL) {
            close(task_fd);
            continue;
        }
        struct dirent *te;
        while ((te = readdir(tasks)) != NULL) {
            if (te->d_name[0] < '0' || te->d_name[0] > '9')
                continue;
            int fd = openat(task_fd, join(path, te->d_name, "/stat"), O_RDONLY | O_CLOEXEC);
            if (fd < 0)
                continue;
            if (read(fd, buf, sizeof buf) > 0)
                read_count++;
            close(fd);
        }
        closedir(tasks);
    }
    closedir(proc);
    return read_count;
}

int main(int argc, char **argv) {
    int iterations = argc > 1 ? atoi(argv[1]) : 1;
    for (int i = 0; i < iterations; i++) {
        long long start = now_ns();
        long count = scan();
        printf("%lld %ld\n", now_ns() - start, count);
    }
    return 0;
}
