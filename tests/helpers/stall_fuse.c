/* A tiny FUSE filesystem spoken over /dev/fuse directly (no libfuse, no fusermount), whose
 * daemon stops answering on demand: the kernel waits behind it are real.
 *
 *   stall_fuse MOUNTPOINT SIZE_MB STOP_ON
 *
 * Mounts a filesystem with one regular file, `data`, of SIZE_MB MiB (reads give zeros, writes
 * are accepted and dropped). STOP_ON is `write` (the first WRITE), `lookup` (the first LOOKUP
 * of a name other than `data`: a create holds its directory's lock while it waits) or `never`:
 * the daemon then stops itself (SIGSTOP) before answering, so the caller waits on a stopped
 * daemon exactly as behind a real one that hangs; SIGCONT lets it answer and go on.
 * OPEN answers ENOSYS, so the kernel stops sending it (no_open) and opens need no daemon once
 * the lookup is cached (entries and attributes stay valid for an hour).
 *
 * Prints "ready" once the kernel's INIT is answered. Exits when the filesystem is unmounted.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define DATA_INO 2
#define VALID_SECONDS 3600

static char buf[1 << 20 | 4096];
static char zeros[1 << 17];
static int dev;
static unsigned long long size;

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void reply(uint64_t unique, int error, const void *body, size_t len) {
    struct fuse_out_header out = {
        .len = sizeof(out) + (error ? 0 : len), .error = -error, .unique = unique};
    struct iovec iov[2] = {{&out, sizeof(out)}, {(void *)body, error ? 0 : len}};
    if (writev(dev, iov, 2) < 0 && errno != ENOENT)
        die("reply");
}

static void fill_attr(struct fuse_attr *attr, uint64_t ino) {
    memset(attr, 0, sizeof(*attr));
    attr->ino = ino;
    attr->nlink = 1;
    attr->blksize = 4096;
    if (ino == FUSE_ROOT_ID) {
        attr->mode = S_IFDIR | 0755;
        attr->nlink = 2;
    } else {
        attr->mode = S_IFREG | 0666;
        attr->size = size;
        attr->blocks = size / 512;
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: stall_fuse MOUNTPOINT SIZE_MB write|lookup|never\n");
        return 2;
    }
    size = strtoull(argv[2], NULL, 10) << 20;
    uint32_t stop_on = strcmp(argv[3], "write") == 0    ? FUSE_WRITE
                       : strcmp(argv[3], "lookup") == 0 ? FUSE_LOOKUP
                                                        : 0;
    dev = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        die("open /dev/fuse");
    char opts[128];
    snprintf(opts, sizeof(opts), "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other", dev);
    if (mount("stall_fuse", argv[1], "fuse.stall_fuse", MS_NOSUID | MS_NODEV, opts) < 0)
        die("mount");
    int stopped = 0;
    for (;;) {
        ssize_t n = read(dev, buf, sizeof(buf));
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == ENOENT)
                continue;
            if (errno == ENODEV)
                return 0; /* unmounted */
            die("read /dev/fuse");
        }
        struct fuse_in_header *in = (struct fuse_in_header *)buf;
        void *arg = buf + sizeof(*in);
        int missing = in->opcode == FUSE_LOOKUP && strcmp((char *)arg, "data") != 0;
        if (!stopped && in->opcode == stop_on && (stop_on != FUSE_LOOKUP || missing)) {
            stopped = 1;
            raise(SIGSTOP);
        }
        switch (in->opcode) {
        case FUSE_INIT: {
            struct fuse_init_in *init = arg;
            struct fuse_init_out out = {
                .major = FUSE_KERNEL_VERSION,
                .minor = FUSE_KERNEL_MINOR_VERSION,
                .max_readahead = init->max_readahead,
                .max_write = 1 << 20,
                .max_background = 16,
                .congestion_threshold = 12,
                .time_gran = 1,
            };
            reply(in->unique, 0, &out, sizeof(out));
            printf("ready\n");
            fflush(stdout);
            break;
        }
        case FUSE_LOOKUP: {
            if (in->nodeid != FUSE_ROOT_ID || strcmp((char *)arg, "data") != 0) {
                reply(in->unique, ENOENT, NULL, 0);
                break;
            }
            struct fuse_entry_out out = {
                .nodeid = DATA_INO,
                .entry_valid = VALID_SECONDS,
                .attr_valid = VALID_SECONDS,
            };
            fill_attr(&out.attr, DATA_INO);
            reply(in->unique, 0, &out, sizeof(out));
            break;
        }
        case FUSE_GETATTR:
        case FUSE_SETATTR: {
            struct fuse_attr_out out = {.attr_valid = VALID_SECONDS};
            fill_attr(&out.attr, in->nodeid);
            reply(in->unique, 0, &out, sizeof(out));
            break;
        }
        case FUSE_READ: {
            struct fuse_read_in *read_in = arg;
            size_t len = read_in->size;
            if (read_in->offset >= size)
                len = 0;
            else if (len > size - read_in->offset)
                len = size - read_in->offset;
            if (len > sizeof(zeros))
                len = sizeof(zeros);
            reply(in->unique, 0, zeros, len);
            break;
        }
        case FUSE_WRITE: {
            struct fuse_write_in *write_in = arg;
            struct fuse_write_out out = {.size = write_in->size};
            reply(in->unique, 0, &out, sizeof(out));
            break;
        }
        case FUSE_FLUSH:
        case FUSE_RELEASE:
        case FUSE_RELEASEDIR:
        case FUSE_FSYNC:
            reply(in->unique, 0, NULL, 0);
            break;
        case FUSE_FORGET:
        case FUSE_BATCH_FORGET:
        case FUSE_INTERRUPT:
            break; /* no reply expected */
        case FUSE_DESTROY:
            reply(in->unique, 0, NULL, 0);
            return 0;
        default:
            reply(in->unique, ENOSYS, NULL, 0);
        }
    }
}
