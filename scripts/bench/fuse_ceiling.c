/* fuse_ceiling: the "C ceiling" of the bench (scripts/bench/), what a FUSE server can reach here.
 *
 * A minimal libfuse server (fuse3, low-level API) that does what tarfuse does for a local archive and
 * nothing more: it shows one read-only file, NAME, in the mount point's directory; the file's bytes are
 * given by a segment map over the tar, and every read is answered with fuse_reply_data straight from the
 * tar's fd (FUSE_BUF_FD_SEEK: libfuse preads it into its reply buffer), holes from a buffer of zeros.
 * tarfuse's figures are read against it: the cost of the kernel round trip is in both, the cost of
 * Python is not in this one.
 *
 * As tarfuse does, it sets the mount's bdi read_ahead_kb right after the INIT reply (the reply resets
 * it) and keeps libfuse's default request size (max_write 1 MiB, max_pages 256), so that the
 * sequential ceiling is fair.
 *
 *     fuse_ceiling [-m] [-r READAHEAD_KB] TAR MAPFILE NAME MOUNTPOINT
 *
 * -m serves with fuse_session_loop_mt instead of the single-threaded fuse_session_loop. MAPFILE has
 * one segment per line, "image_offset length tar_offset" (tar_offset -1: a hole), tiling the image in
 * order. It stays in the foreground; SIGTERM, SIGINT or an unmount end it.
 *
 * Built by the bench (tools.py, on first use, into build/) with: cc -O2 $(pkg-config --cflags --libs fuse3)
 */
#define FUSE_USE_VERSION 312
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#define IMAGE_INO 2
#define TIMEOUT 3600.0              /* nothing ever changes: as tarfuse's hours */
#define MAX_REPLY (1 << 20)         /* the kernel asks for at most max_pages (256) pages */

struct segment {
    off_t logical, length, physical; /* physical < 0: a hole */
};

static struct segment *segments;
static size_t segment_count;
static off_t image_size;
static int tar_fd;
static const char *image_name;
static char zeros[MAX_REPLY]; /* never written: holes are read from it (in .bss, not in the binary) */

static void load_map(const char *path)
{
    FILE *map = fopen(path, "r");
    size_t capacity = 1024;
    long long logical, length, physical;

    if (map == NULL || (segments = malloc(capacity * sizeof *segments)) == NULL) {
        perror(path);
        exit(1);
    }
    while (fscanf(map, "%lld %lld %lld", &logical, &length, &physical) == 3) {
        if (logical != image_size || length <= 0) {
            fprintf(stderr, "%s: segment at %lld does not follow the last one\n", path, logical);
            exit(1);
        }
        if (segment_count == capacity &&
            (segments = realloc(segments, (capacity *= 2) * sizeof *segments)) == NULL) {
            perror("realloc");
            exit(1);
        }
        segments[segment_count++] = (struct segment){logical, length, physical};
        image_size += length;
    }
    fclose(map);
}

static void fill_attr(fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    st->st_uid = getuid();
    st->st_gid = getgid();
    if (ino == FUSE_ROOT_ID) {
        st->st_mode = S_IFDIR | 0555;
        st->st_nlink = 2;
    } else {
        st->st_mode = S_IFREG | 0444;
        st->st_nlink = 1;
        st->st_size = image_size;
        st->st_blksize = 4096;
        st->st_blocks = (image_size + 511) / 512;
    }
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fuse_entry_param entry = {.ino = IMAGE_INO, .attr_timeout = TIMEOUT, .entry_timeout = TIMEOUT};

    if (parent != FUSE_ROOT_ID || strcmp(name, image_name) != 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    fill_attr(IMAGE_INO, &entry.attr);
    fuse_reply_entry(req, &entry);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;

    (void)fi;
    if (ino != FUSE_ROOT_ID && ino != IMAGE_INO) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    fill_attr(ino, &st);
    fuse_reply_attr(req, &st, TIMEOUT);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (ino != IMAGE_INO)
        fuse_reply_err(req, EISDIR);
    else if ((fi->flags & O_ACCMODE) != O_RDONLY)
        fuse_reply_err(req, EROFS);
    else {
        fi->keep_cache = 1; /* as tarfuse: the bytes never change while mounted */
        fuse_reply_open(req, fi);
    }
}

/* One buffer per segment the read touches: the tar's fd at the segment's offset, or zeros. */
static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, struct fuse_file_info *fi)
{
    size_t low = 0, high = segment_count, count = 0, i;
    off_t end, at = offset;
    struct fuse_bufvec *reply;

    (void)ino, (void)fi;
    if (offset >= image_size || size == 0) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    end = offset + (off_t)(size < MAX_REPLY ? size : MAX_REPLY);
    end = end < image_size ? end : image_size;
    while (high - low > 1) { /* the last segment that starts at or before offset */
        size_t middle = (low + high) / 2;
        if (segments[middle].logical <= offset)
            low = middle;
        else
            high = middle;
    }
    for (i = low; i < segment_count && segments[i].logical < end; i++)
        count++;
    reply = malloc(sizeof *reply + count * sizeof reply->buf[0]);
    if (reply == NULL) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    *reply = (struct fuse_bufvec){.count = count};
    for (i = 0; i < count; i++) {
        const struct segment *s = &segments[low + i];
        off_t stop = s->logical + s->length < end ? s->logical + s->length : end;
        struct fuse_buf *buf = &reply->buf[i];

        *buf = (struct fuse_buf){.size = (size_t)(stop - at)};
        if (s->physical < 0) {
            buf->mem = zeros;
        } else {
            buf->flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
            buf->fd = tar_fd;
            buf->pos = s->physical + (at - s->logical);
        }
        at = stop;
    }
    fuse_reply_data(req, reply, 0);
    free(reply);
}

/* Undo mountinfo's octal escapes of space, tab, newline and backslash ("\040"), in place. */
static void unescape(char *text)
{
    char *out = text;
    unsigned code;

    for (; *text != '\0'; out++)
        if (text[0] == '\\' && sscanf(text + 1, "%3o", &code) == 1)
            *out = (char)code, text += 4;
        else
            *out = *text++;
    *out = '\0';
}

/* The mount's readahead, as tarfuse.serve.daemon.tune_readahead sets it: bdi "major:minor" of the mount. */
static void set_readahead(const char *mountpoint, int kib)
{
    char line[4096], path[128], point[4096];
    unsigned major_id = 0, minor_id = 0, found = 0;
    FILE *mounts = fopen("/proc/self/mountinfo", "r"), *knob;

    while (mounts != NULL && fgets(line, sizeof line, mounts) != NULL) {
        unsigned a, b;
        if (sscanf(line, "%*u %*u %u:%u %*s %4095s", &a, &b, point) != 3)
            continue;
        unescape(point);
        if (strcmp(point, mountpoint) == 0)
            major_id = a, minor_id = b, found = 1; /* the last one: the topmost mount */
    }
    if (mounts != NULL)
        fclose(mounts);
    snprintf(path, sizeof path, "/sys/class/bdi/%u:%u/read_ahead_kb", major_id, minor_id);
    if (!found || (knob = fopen(path, "w")) == NULL) {
        fprintf(stderr, "fuse_ceiling: could not set %s\n", path);
        return;
    }
    fprintf(knob, "%d\n", kib);
    fclose(knob);
}

int main(int argc, char *argv[])
{
    struct fuse_lowlevel_ops ops = {.lookup = op_lookup, .getattr = op_getattr, .open = op_open, .read = op_read};
    struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
    struct fuse_buf init = {0};
    struct fuse_session *session;
    char options[4200], *mountpoint;
    int multithreaded = 0, readahead_kb = 4096, option, status;

    while ((option = getopt(argc, argv, "mr:")) != -1) {
        if (option == 'm')
            multithreaded = 1;
        else if (option == 'r')
            readahead_kb = atoi(optarg);
        else
            return 2;
    }
    if (argc - optind != 4) {
        fprintf(stderr, "usage: %s [-m] [-r READAHEAD_KB] TAR MAPFILE NAME MOUNTPOINT\n", argv[0]);
        return 2;
    }
    if ((tar_fd = open(argv[optind], O_RDONLY | O_CLOEXEC)) < 0 ||
        (mountpoint = realpath(argv[optind + 3], NULL)) == NULL) {
        perror(argv[optind]);
        return 1;
    }
    load_map(argv[optind + 1]);
    image_name = argv[optind + 2];
    snprintf(options, sizeof options, "ro,default_permissions,subtype=fuse_ceiling,fsname=%s", argv[optind]);
    if (fuse_opt_add_arg(&args, argv[0]) || fuse_opt_add_arg(&args, "-o") || fuse_opt_add_arg(&args, options))
        return 1;
    session = fuse_session_new(&args, &ops, sizeof ops, NULL);
    if (session == NULL || fuse_set_signal_handlers(session) || fuse_session_mount(session, mountpoint))
        return 1;
    /* The first request is INIT: answer it here, so that the readahead is set before anything opens. */
    if (fuse_session_receive_buf(session, &init) > 0)
        fuse_session_process_buf(session, &init);
    free(init.mem);
    set_readahead(mountpoint, readahead_kb);
    if (multithreaded) {
        struct fuse_loop_config *config = fuse_loop_cfg_create();
        status = fuse_session_loop_mt(session, config);
        fuse_loop_cfg_destroy(config);
    } else {
        status = fuse_session_loop(session);
    }
    fuse_session_unmount(session);
    fuse_remove_signal_handlers(session);
    fuse_session_destroy(session);
    fuse_opt_free_args(&args);
    return status < 0 ? 1 : 0;
}
