/* Checks shared by the C test programs: on failure, say where, what, and
 * shadowfd_last_error(), then exit 2. CHECK_ERR needs a
 * check_message, defined below with the file-loading helpers. */
#ifndef SHADOWFD_TEST_CHECK_H
#define SHADOWFD_TEST_CHECK_H

#include <shadowfd.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
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

/* A call that must return NULL with errno `err` and a message with `word`. */
#define CHECK_NULL(e, err, word)                                               \
    do {                                                                       \
        errno = 0;                                                             \
        const void *p_ = (const void *)(e);                                    \
        int en_ = errno;                                                       \
        if (p_ != NULL)                                                        \
            FAIL("%s succeeded, expected NULL with errno %s", #e, #err);       \
        if (en_ != (err))                                                      \
            FAIL("%s: errno %d (%s), expected %s", #e, en_, strerror(en_),     \
                 #err);                                                        \
        check_message(#e, word);                                               \
    } while (0)

static size_t page;
static unsigned char *want; /* the file's bytes */
static size_t want_len;

/* Where the mapping watched for SIGBUS starts (watch_sigbus). */
__attribute__((unused)) static volatile uintptr_t fault_base;

/* Exits 100 + the page of the watched mapping the SIGBUS came at, modulo
 * 100 (what an exit status holds). */
__attribute__((unused)) static void on_sigbus(int sig, siginfo_t *si, void *uc) {
    (void)sig;
    (void)uc;
    uintptr_t at = (uintptr_t)si->si_addr;
    _exit(100 + (int)(((at - fault_base) / page) % 100));
}

/* In a child about to touch the mapping at `base`: a SIGBUS there ends it
 * with status 100 + the page (on_sigbus). */
__attribute__((unused)) static void watch_sigbus(void *base) {
    fault_base = (uintptr_t)base;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    CHECK(sigaction(SIGBUS, &sa, NULL) == 0);
}

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

/* `len` bytes at `got` are the file's bytes from `off`; else FAIL naming
 * the first offset that differs. */
__attribute__((unused)) static void same(const void *got, size_t off, size_t len,
                                         const char *what) {
    if (off + len > want_len || memcmp(got, want + off, len) != 0) {
        const unsigned char *g = got;
        size_t i = 0;
        while (i < len && off + i < want_len && g[i] == want[off + i])
            i++;
        FAIL("%s: bytes differ from the file at offset %zu", what, off + i);
    }
}

/* A test program's start: the page size, unbuffered output (lines stay in
 * order with a child's), and the expected bytes from `file`. */
__attribute__((unused)) static void setup(const char *file) {
    page = (size_t)sysconf(_SC_PAGESIZE);
    setvbuf(stdout, NULL, _IONBF, 0);
    load(file);
}

/* main's first step: at least `need` arguments (else the usage line and
 * exit status 2), then setup() with argv[file_arg]. */
__attribute__((unused)) static void start(int argc, char **argv, int need, const char *usage,
                                          int file_arg) {
    if (argc < need) {
        fprintf(stderr, "usage: %s %s\n", argv[0], usage);
        exit(2);
    }
    setup(argv[file_arg]);
}

#endif
