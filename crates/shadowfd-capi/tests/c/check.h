/* Checks shared by the C test programs: on failure, say where, what, and
 * shadowfd_last_error(), then exit 2. CHECK_ERR needs a
 * check_message, defined below with the file-loading helpers. */
#ifndef SHADOWFD_TEST_CHECK_H
#define SHADOWFD_TEST_CHECK_H

#include <shadowfd.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FAIL(...)                                                              \
    do {                                                                       \
        fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                   \
        fprintf(stderr, __VA_ARGS__);                                          \
        const char *le_ = shadowfd_last_error();                               \
        fprintf(stderr, "\n  last error: %s\n", le_ ? le_ : "(none)");         \
        exit(2);                                                               \
    } while (0)
#define CHECK(c)                                                               \
    do {                                                                       \
        if (!(c))                                                              \
            FAIL("%s", #c);                                                    \
    } while (0)
#define CHECK_OK(e)                                                            \
    do {                                                                       \
        long long r_ = (long long)(e);                                         \
        if (r_ < 0)                                                            \
            FAIL("%s = %lld (%s)", #e, r_, strerror((int)-r_));                \
    } while (0)
/* A call that must fail with -err and leave a message containing `word`. */
#define CHECK_ERR(e, err, word)                                                \
    do {                                                                       \
        long long r_ = (long long)(e);                                         \
        if (r_ != -(long long)(err))                                           \
            FAIL("%s = %lld, expected -%s", #e, r_, #err);                     \
        check_message(#e, word);                                               \
    } while (0)


static size_t page;
static unsigned char *want; /* the file's bytes */
static size_t want_len;

/* The last call left a message, containing `word` if not NULL. */
static void check_message(const char *what, const char *word) {
    const char *m = shadowfd_last_error();
    if (!m || !*m)
        FAIL("%s: no message", what);
    if (word && !strstr(m, word))
        FAIL("%s: message lacks \"%s\": %s", what, word, m);
    printf("ok: %s -> %s\n", what, m);
}

/* Reads the file at `path` into `want`. */
static void load(const char *path) {
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0);
    struct stat st;
    CHECK(fstat(fd, &st) == 0);
    want_len = (size_t)st.st_size;
    want = malloc(want_len + 1);
    CHECK(want);
    size_t done = 0;
    while (done < want_len) {
        ssize_t n = pread(fd, want + done, want_len - done, (off_t)done);
        CHECK(n > 0);
        done += (size_t)n;
    }
    close(fd);
}

#endif
