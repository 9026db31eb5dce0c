/*
 * fs.c: the few file-system calls Lua needs and cannot make portably through plain io:
 * listing folders, creating them, telling files from folders, copying files and removing
 * trees (checkpoint folders are written under a temporary name, then renamed into place).
 * Errors name the path and carry strerror's text.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

NEMO_API int nemo_fs_kind(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) return 0;
    if (S_ISDIR(st.st_mode)) return 2;
    return 1;
}

NEMO_API int64_t nemo_fs_size(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) return NEMO_ERR(NEMO_EIO, "%s: %s", path, strerror(errno));
    return (int64_t)st.st_size;
}

NEMO_API char *nemo_fs_list(const char *path) {
    DIR *d = opendir(path);
    if (!d) { NEMO_ERR(NEMO_EIO, "cannot list '%s': %s", path, strerror(errno)); return NULL; }
    size_t cap = 1024, n = 0;
    char *out = malloc(cap);
    if (!out) { closedir(d); NEMO_ERR(NEMO_ENOMEM, "out of memory"); return NULL; }
    out[0] = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        size_t len = strlen(e->d_name);
        if (n + len + 2 > cap) {
            while (n + len + 2 > cap) cap *= 2;
            char *p = realloc(out, cap);
            if (!p) { free(out); closedir(d); NEMO_ERR(NEMO_ENOMEM, "out of memory"); return NULL; }
            out = p;
        }
        memcpy(out + n, e->d_name, len);
        n += len;
        out[n++] = '\n';
        out[n] = 0;
    }
    closedir(d);
    return out;
}

NEMO_API int nemo_fs_mkdirs(const char *path) {
    char buf[4096];
    size_t len = strlen(path);
    if (len == 0 || len >= sizeof buf) return NEMO_ERR(NEMO_EINVAL, "mkdirs: bad path '%s'", path);
    memcpy(buf, path, len + 1);
    for (char *p = buf + 1; ; p++) {
        if (*p == '/' || *p == 0) {
            char c = *p;
            *p = 0;
            if (mkdir(buf, 0777) != 0 && errno != EEXIST)
                return NEMO_ERR(NEMO_EIO, "cannot create folder '%s': %s", buf, strerror(errno));
            struct stat st;
            if (stat(buf, &st) != 0 || !S_ISDIR(st.st_mode))
                return NEMO_ERR(NEMO_EIO, "cannot create folder '%s': a file is in the way", buf);
            *p = c;
            if (c == 0) break;
        }
    }
    return 0;
}

NEMO_API int nemo_fs_copy_file(const char *src, const char *dst) {
    int in = open(src, O_RDONLY);
    if (in < 0) return NEMO_ERR(NEMO_EIO, "cannot read '%s': %s", src, strerror(errno));
    int out = open(dst, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (out < 0) { int e = errno; close(in); return NEMO_ERR(NEMO_EIO, "cannot write '%s': %s", dst, strerror(e)); }
    char buf[1 << 16];
    ssize_t r;
    int rc = 0;
    while ((r = read(in, buf, sizeof buf)) > 0) {
        ssize_t off = 0;
        while (off < r) {
            ssize_t w = write(out, buf + off, (size_t)(r - off));
            if (w < 0) { rc = NEMO_ERR(NEMO_EIO, "cannot write '%s': %s", dst, strerror(errno)); goto done; }
            off += w;
        }
    }
    if (r < 0) rc = NEMO_ERR(NEMO_EIO, "cannot read '%s': %s", src, strerror(errno));
    if (rc == 0 && fsync(out) != 0) rc = NEMO_ERR(NEMO_EIO, "cannot sync '%s': %s", dst, strerror(errno));
done:
    close(in);
    if (close(out) != 0 && rc == 0) rc = NEMO_ERR(NEMO_EIO, "cannot close '%s': %s", dst, strerror(errno));
    return rc;
}

/* rename(2): atomic within a file system; replaces dst if it is a file or an empty folder. */
NEMO_API int nemo_fs_rename(const char *src, const char *dst) {
    if (rename(src, dst) != 0) return NEMO_ERR(NEMO_EIO, "cannot rename '%s' to '%s': %s", src, dst, strerror(errno));
    return 0;
}

static int remove_tree(const char *path, int depth) {
    if (depth > 64) return NEMO_ERR(NEMO_EIO, "remove_tree: '%s' is nested too deeply", path);
    struct stat st;
    if (lstat(path, &st) != 0) return errno == ENOENT ? 0 : NEMO_ERR(NEMO_EIO, "%s: %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        if (!d) return NEMO_ERR(NEMO_EIO, "cannot list '%s': %s", path, strerror(errno));
        struct dirent *e;
        int rc = 0;
        while ((e = readdir(d)) && rc == 0) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            char sub[4096];
            snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
            rc = remove_tree(sub, depth + 1);
        }
        closedir(d);
        if (rc < 0) return rc;
        if (rmdir(path) != 0) return NEMO_ERR(NEMO_EIO, "cannot remove '%s': %s", path, strerror(errno));
        return 0;
    }
    if (unlink(path) != 0) return NEMO_ERR(NEMO_EIO, "cannot remove '%s': %s", path, strerror(errno));
    return 0;
}

NEMO_API int nemo_fs_remove_tree(const char *path) { return remove_tree(path, 0); }

/* fsync a folder so that renames inside it are durable. */
NEMO_API int nemo_fs_sync_dir(const char *path) {
    int fd = open(path, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return NEMO_ERR(NEMO_EIO, "cannot open folder '%s': %s", path, strerror(errno));
    fsync(fd);
    close(fd);
    return 0;
}
