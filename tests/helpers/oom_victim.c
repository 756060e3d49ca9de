/* Waits for one byte on stdin (so the test can move it into a memory cgroup first), then
 * touches `argv[1]` MiB (default 100) of anonymous memory, one MiB at a time, so that a
 * smaller cgroup limit makes the kernel's OOM killer kill it. Exits 0 if it survives. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    char go;
    if (read(0, &go, 1) != 1)
        return 2;
    long mib = argc > 1 ? atol(argv[1]) : 100;
    for (long i = 0; i < mib; i++) {
        char *chunk = malloc(1 << 20);
        if (chunk == NULL)
            return 3;
        memset(chunk, (int)i + 1, 1 << 20);
    }
    return 0;
}
