/* The C ABI under test: one program, one case per argv[1], each run by a
 * Rust test in ../c_abi.rs. Exit status 0 is a pass; anything else prints
 * why on stderr. Usage: abi_test CASE FILE MODE [ARG]. */
#define _GNU_SOURCE
#include <shadowfd.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

static const char *mode;

static shadowfd_engine *engine_with(const char *const *kv) {
    shadowfd_config *c = shadowfd_config_new();
    CHECK(c);
    CHECK_OK(shadowfd_config_set(c, "mode", mode));
    for (; kv && kv[0]; kv += 2)
        CHECK_OK(shadowfd_config_set(c, kv[0], kv[1]));
    shadowfd_engine *e = shadowfd_engine_new(c);
    shadowfd_config_free(c);
    if (!e)
        FAIL("shadowfd_engine_new(mode %s)", mode);
    int m = shadowfd_engine_mode(e);
    CHECK(m == (strcmp(mode, "lazy") == 0 ? SHADOWFD_MODE_LAZY : SHADOWFD_MODE_EAGER));
    return e;
}

/* ---- a callback source over a file descriptor ---------------------------- */

struct src {
    int fd;
    uint64_t size;
    uint64_t bad_page;  /* UINT64_MAX: none */
    int bad_errno;      /* 0: end of file at bad_page instead of an error */
    size_t max_read;    /* 0: no limit (else short reads) */
    unsigned delay_us;  /* each read blocks this long */
    atomic_int inside;  /* callbacks running now */
    atomic_int most_inside;
    atomic_long calls;
    atomic_int released;
    shadowfd_shadow *reenter; /* a shadow the callback tries to read */
    atomic_int reenter_result;
};

static int64_t src_read(void *ctx, void *buf, size_t len, uint64_t off) {
    struct src *s = ctx;
    int now = atomic_fetch_add(&s->inside, 1) + 1;
    int most = atomic_load(&s->most_inside);
    while (now > most && !atomic_compare_exchange_weak(&s->most_inside, &most, now))
        ;
    atomic_fetch_add(&s->calls, 1);
    if (s->delay_us)
        usleep(s->delay_us);
    if (s->reenter) {
        char b[16];
        atomic_store(&s->reenter_result, (int)shadowfd_read(s->reenter, b, sizeof b, 0));
    }
    int64_t r;
    if (s->bad_page != UINT64_MAX) {
        uint64_t bad = s->bad_page * page;
        if (off <= bad && bad < off + len && off < bad) {
            len = (size_t)(bad - off); /* stop short before the bad page */
        } else if (off <= bad && bad < off + len) {
            atomic_fetch_sub(&s->inside, 1);
            return s->bad_errno ? -s->bad_errno : 0;
        }
    }
    if (s->max_read && len > s->max_read)
        len = s->max_read;
    r = pread(s->fd, buf, len, (off_t)off);
    if (r < 0)
        r = -errno;
    atomic_fetch_sub(&s->inside, 1);
    return r;
}

static int src_stat(void *ctx, shadowfd_meta *out) {
    struct src *s = ctx;
    memset(out, 0, sizeof *out);
    out->size = s->size;
    out->inode = 42;
    return 0;
}

static void src_release(void *ctx) {
    struct src *s = ctx;
    atomic_fetch_add(&s->released, 1);
}

/* release(ctx) runs once the library no longer needs the source: the last
 * free waits for a fill still in flight, so it has run when that returns. */
static void await_released(struct src *s, int want) {
    CHECK(atomic_load(&s->released) == want);
}

static struct src *src_new(const char *path) {
    struct src *s = calloc(1, sizeof *s);
    CHECK(s);
    s->fd = open(path, O_RDONLY);
    CHECK(s->fd >= 0);
    s->size = want_len;
    s->bad_page = UINT64_MAX;
    return s;
}

static shadowfd_shadow *open_src(shadowfd_engine *e, struct src *s, uint32_t flags) {
    shadowfd_source_ops ops = {src_read, src_stat, src_release, flags, "test callback"};
    shadowfd_shadow *sh = shadowfd_open_source(e, &ops, s);
    if (!sh)
        FAIL("shadowfd_open_source");
    return sh;
}

/* ---- cases ----------------------------------------------------------------- */

/* A callback source's bytes match the file: through a mapping and through
 * shadowfd_read; with short reads and a blocking callback too. */
static int case_callback(const char *path) {
    for (int variant = 0; variant < 3; variant++) {
        shadowfd_engine *e = engine_with(NULL);
        struct src *s = src_new(path);
        if (variant == 1)
            s->max_read = 100; /* short reads: retried */
        if (variant == 2)
            s->delay_us = 20000; /* a callback that blocks */
        shadowfd_shadow *sh = open_src(e, s, 0);
        CHECK(shadowfd_shadow_size(sh) == want_len);
        void *p = NULL;
        CHECK_OK(shadowfd_map(sh, 0, 0, SHADOWFD_MAP_SHARED, NULL, &p));
        same(p, 0, want_len, "callback mapping");
        unsigned char *buf = malloc(want_len);
        CHECK(buf);
        CHECK(shadowfd_read(sh, buf, want_len, 0) == (int64_t)want_len);
        same(buf, 0, want_len, "callback read");
        free(buf);
        char *js = shadowfd_stats_json(sh);
        CHECK(js && strstr(js, "bytes_filled"));
        printf("variant %d stats: %s\n", variant, js);
        shadowfd_string_free(js);
        char *ejs = shadowfd_engine_stats_json(e);
        CHECK(ejs);
        shadowfd_string_free(ejs);
        CHECK(atomic_load(&s->calls) > 0);
        /* The engine and the shadow go first; a lazy mapping keeps the
         * source (an eager one needs it no more). */
        shadowfd_engine_free(e);
        shadowfd_shadow_free(sh);
        same(p, 0, want_len, "mapping after the shadow was freed");
        CHECK(atomic_load(&s->released) == (strcmp(mode, "lazy") == 0 ? 0 : 1));
        CHECK_OK(shadowfd_unmap(p, want_len));
        await_released(s, 1);
        close(s->fd);
        free(s);
    }
    return 0;
}

/* An error (or an early end) from the callback at page `bad`: SIGBUS at
 * exactly that page of a mapping, in a child; the errno from read/fill. */
static int case_eio(const char *path, uint64_t bad, int err) {
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        shadowfd_engine *e = engine_with(NULL);
        struct src *s = src_new(path);
        s->bad_page = bad;
        s->bad_errno = err;
        shadowfd_shadow *sh = open_src(e, s, 0);
        void *p = NULL;
        CHECK_OK(shadowfd_map(sh, 0, 0, SHADOWFD_MAP_PRIVATE, NULL, &p));
        watch_sigbus(p);
        const volatile unsigned char *b = p;
        for (size_t off = 0; off < want_len; off += page) {
            size_t n = want_len - off < page ? want_len - off : page;
            unsigned char tmp[65536];
            CHECK(page <= sizeof tmp);
            for (size_t i = 0; i < n; i++)
                tmp[i] = b[off + i];
            same(tmp, off, n, "pages before the bad one");
        }
        fprintf(stderr, "no SIGBUS anywhere\n");
        _exit(3);
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 100 + (int)(bad % 100))
        FAIL("child: expected SIGBUS at page %llu (exit %d), got status %#x",
             (unsigned long long)bad, 100 + (int)(bad % 100), st);
    printf("ok: SIGBUS at exactly page %llu\n", (unsigned long long)bad);

    /* In this process: the reads around it work, the bad page's fail. */
    shadowfd_engine *e = engine_with(NULL);
    struct src *s = src_new(path);
    s->bad_page = bad;
    s->bad_errno = err;
    shadowfd_shadow *sh = open_src(e, s, 0);
    unsigned char *buf = malloc(page);
    CHECK(buf);
    CHECK(shadowfd_read(sh, buf, page, (bad - 1) * page) == (int64_t)page);
    same(buf, (bad - 1) * page, page, "the page before the bad one");
    int want_err = err ? err : EIO;
    CHECK_ERR(shadowfd_read(sh, buf, page, bad * page), want_err, err ? "offset" : "ended");
    CHECK_ERR(shadowfd_fill(sh, 0, want_len), want_err, NULL);
    CHECK_ERR(shadowfd_materialize(sh), want_err, NULL);
    char *js = shadowfd_stats_json(sh);
    CHECK(js);
    printf("stats: %s\n", js);
    shadowfd_string_free(js);
    free(buf);
    shadowfd_shadow_free(sh);
    shadowfd_engine_free(e);
    await_released(s, 1);
    return 0;
}

/* The same failure in eager mode fails the open itself. */
static int case_eio_eager(const char *path, uint64_t bad) {
    shadowfd_engine *e = engine_with(NULL);
    struct src *s = src_new(path);
    s->bad_page = bad;
    s->bad_errno = EIO;
    shadowfd_source_ops ops = {src_read, src_stat, src_release, 0, "failing source"};
    errno = 0;
    CHECK(shadowfd_open_source(e, &ops, s) == NULL);
    CHECK(errno == EIO);
    check_message("eager open of a failing source", "failing source");
    CHECK(atomic_load(&s->released) == 1);
    shadowfd_engine_free(e);
    return 0;
}

struct reader {
    shadowfd_shadow *sh;
    uint64_t first, step;
};

static void *reader_main(void *arg) {
    struct reader *r = arg;
    unsigned char *buf = malloc(page);
    if (!buf)
        abort();
    for (uint64_t off = r->first * page; off < want_len; off += r->step * page) {
        int64_t n = shadowfd_read(r->sh, buf, page, off);
        if (n <= 0) {
            fprintf(stderr, "read at %llu: %lld %s\n", (unsigned long long)off, (long long)n,
                    shadowfd_last_error());
            abort();
        }
        if (memcmp(buf, want + off, (size_t)n) != 0)
            abort();
    }
    free(buf);
    return NULL;
}

/* Four threads fault at once; the serialized callback is never entered
 * twice at once. The same load unserialized is measured for contrast. */
static int case_serialized(const char *path) {
    const char *kv[] = {"workers", "4", "readahead", "0", "chunk", "4K", NULL};
    for (int serialized = 1; serialized >= 0; serialized--) {
        shadowfd_engine *e = engine_with(kv);
        struct src *s = src_new(path);
        s->delay_us = 2000;
        shadowfd_shadow *sh = open_src(e, s, serialized ? SHADOWFD_SOURCE_SERIALIZED : 0);
        pthread_t t[4];
        struct reader r[4];
        for (int i = 0; i < 4; i++) {
            r[i] = (struct reader){sh, (uint64_t)i, 4};
            CHECK(pthread_create(&t[i], NULL, reader_main, &r[i]) == 0);
        }
        for (int i = 0; i < 4; i++)
            CHECK(pthread_join(t[i], NULL) == 0);
        printf("serialized=%d: %ld callbacks, at most %d at once\n", serialized,
               atomic_load(&s->calls), atomic_load(&s->most_inside));
        if (serialized)
            CHECK(atomic_load(&s->most_inside) == 1);
        CHECK(atomic_load(&s->calls) > 4);
        shadowfd_shadow_free(sh);
        shadowfd_engine_free(e);
        await_released(s, 1);
    }
    return 0;
}

struct mapper {
    shadowfd_shadow *sh;
    int id;
    int failed;
};

static void *mapper_main(void *arg) {
    struct mapper *m = arg;
    size_t n_pages = want_len / page;
    for (int round = 0; round < 40; round++) {
        uint64_t pg = (uint64_t)(m->id * 7 + round) % (n_pages - 2);
        void *p = NULL;
        if (shadowfd_map(m->sh, pg * page, 2 * page, round % 2, NULL, &p) < 0 ||
            memcmp(p, want + pg * page, 2 * page) != 0 || shadowfd_unmap(p, 2 * page) < 0) {
            m->failed = 1;
            return NULL;
        }
        /* A failure here leaves this thread's own message, naming its
         * own unaligned offset. */
        if (shadowfd_map(m->sh, (uint64_t)m->id + 1, page, 0, NULL, &p) != -EINVAL) {
            m->failed = 2;
            return NULL;
        }
        const char *msg = shadowfd_last_error();
        char hex[32];
        snprintf(hex, sizeof hex, "%#x", m->id + 1);
        if (!msg || !strstr(msg, hex)) {
            m->failed = 3;
            return NULL;
        }
    }
    return NULL;
}

/* Maps and unmaps from four threads at once on one shadow; each thread's
 * last error is its own. */
static int case_threads(const char *path) {
    shadowfd_engine *e = engine_with(NULL);
    shadowfd_shadow *sh = shadowfd_open_path(e, path);
    CHECK(sh);
    pthread_t t[4];
    struct mapper m[4];
    for (int i = 0; i < 4; i++) {
        m[i] = (struct mapper){sh, i, 0};
        CHECK(pthread_create(&t[i], NULL, mapper_main, &m[i]) == 0);
    }
    for (int i = 0; i < 4; i++) {
        CHECK(pthread_join(t[i], NULL) == 0);
        if (m[i].failed)
            FAIL("thread %d failed at step %d", i, m[i].failed);
    }
    shadowfd_shadow_free(sh);
    shadowfd_engine_free(e);
    return 0;
}

/* Offset/len maps, shared and private; MAP_FIXED into a reservation. */
static int case_maps(const char *path) {
    shadowfd_engine *e = engine_with(NULL);
    shadowfd_shadow *sh = shadowfd_open_path(e, path);
    CHECK(sh);
    CHECK(shadowfd_shadow_size(sh) == want_len);
    size_t n_pages = (want_len + page - 1) / page;
    CHECK(n_pages >= 8);
    for (int fl = 0; fl < 2; fl++) {
        int flags = fl ? SHADOWFD_MAP_PRIVATE : SHADOWFD_MAP_SHARED;
        void *p = NULL;
        CHECK_OK(shadowfd_map(sh, 2 * page, 3 * page, flags, NULL, &p));
        same(p, 2 * page, 3 * page, "offset/len map");
        /* The tail: from a page offset to the end, which ends mid-page. */
        void *q = NULL;
        size_t tail_off = (n_pages - 2) * page;
        CHECK_OK(shadowfd_map(sh, tail_off, 0, flags, NULL, &q));
        same(q, tail_off, want_len - tail_off, "tail map");
        /* MAP_FIXED at a page inside a reservation. */
        size_t resv_len = (n_pages + 4) * page;
        unsigned char *resv =
            mmap(NULL, resv_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        CHECK(resv != MAP_FAILED);
        void *f = NULL;
        CHECK_OK(shadowfd_map(sh, page, 4 * page, flags, resv + 2 * page, &f));
        CHECK(f == resv + 2 * page);
        same(f, page, 4 * page, "fixed map");
        /* A second fixed map over it is refused: unmap it first. */
        void *g = NULL;
        CHECK_ERR(shadowfd_map(sh, 0, page, flags, resv + 3 * page, &g), EEXIST, "shadowfd_unmap");
        CHECK_ERR(shadowfd_unmap(f, page), EINVAL, "not 4096");
        CHECK_OK(shadowfd_unmap(f, 4 * page));
        /* Back to a reservation: map it again, whole file this time. */
        CHECK_OK(shadowfd_map(sh, 0, 0, flags, resv, &g));
        same(g, 0, want_len, "fixed map of the whole file");
        CHECK_OK(shadowfd_unmap(g, want_len));
        CHECK(munmap(resv, resv_len) == 0);
        CHECK_OK(shadowfd_unmap(p, 3 * page));
        CHECK_OK(shadowfd_unmap(q, want_len - tail_off));
        CHECK_ERR(shadowfd_unmap(p, 3 * page), EINVAL, "no range");
    }
    /* Errors. */
    void *p = NULL;
    CHECK_ERR(shadowfd_map(sh, 100, page, 0, NULL, &p), EINVAL, "page size");
    CHECK_ERR(shadowfd_map(sh, 0, want_len + 1, 0, NULL, &p), ERANGE, "outside");
    CHECK_ERR(shadowfd_map(sh, 0, page, 7, NULL, &p), EINVAL, "flags");
    CHECK_ERR(shadowfd_map(sh, 0, page, 0, NULL, NULL), EINVAL, "out is NULL");
    CHECK_ERR(shadowfd_map(NULL, 0, page, 0, NULL, &p), EINVAL, "shadow is NULL");
    CHECK_ERR(shadowfd_map(sh, 0, page, 0, (void *)(uintptr_t)123, &p), EINVAL, "page");
    shadowfd_shadow_free(sh);
    shadowfd_engine_free(e);
    return 0;
}

/* A mapping the caller made of shadowfd_mapping_fd, registered. */
static int case_register(const char *path) {
    shadowfd_engine *e = engine_with(NULL);
    shadowfd_shadow *sh = shadowfd_open_path(e, path);
    CHECK(sh);
    int mfd = shadowfd_mapping_fd(sh);
    CHECK(mfd >= 0);
    /* Private, where the kernel picks; unregister, then munmap ourselves. */
    void *a = mmap(NULL, 3 * page, PROT_READ, MAP_PRIVATE, mfd, (off_t)page);
    CHECK(a != MAP_FAILED);
    CHECK_OK(shadowfd_register(sh, a, 3 * page, page));
    same(a, page, 3 * page, "registered private mapping");
    CHECK_ERR(shadowfd_register(sh, a, page, page), EEXIST, "overlaps");
    CHECK_ERR(shadowfd_unregister(a, page), EINVAL, "bytes");
    CHECK_OK(shadowfd_unregister(a, 3 * page));
    CHECK(munmap(a, 3 * page) == 0);
    /* Shared and MAP_FIXED into a reservation, as a guest would; then
     * shadowfd_unmap unregisters and unmaps it. */
    unsigned char *resv = mmap(NULL, 16 * page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(resv != MAP_FAILED);
    void *b = mmap(resv + 4 * page, 4 * page, PROT_READ, MAP_SHARED | MAP_FIXED, mfd,
                   (off_t)(2 * page));
    CHECK(b == resv + 4 * page);
    CHECK_OK(shadowfd_register(sh, b, 4 * page, 2 * page));
    same(b, 2 * page, 4 * page, "registered shared fixed mapping");
    CHECK_OK(shadowfd_unmap(b, 4 * page));
    CHECK(munmap(resv, 16 * page) == 0);
    /* Errors. */
    void *c = mmap(NULL, page, PROT_READ, MAP_PRIVATE, mfd, 0);
    CHECK(c != MAP_FAILED);
    CHECK_ERR(shadowfd_register(sh, c, page, 1), EINVAL, "page size");
    CHECK_ERR(shadowfd_register(sh, c, want_len + page, 0), ERANGE, "outside");
    CHECK_ERR(shadowfd_register(sh, NULL, page, 0), EINVAL, "addr is NULL");
    CHECK_ERR(shadowfd_register(sh, c, 0, 0), EINVAL, "len is 0");
    CHECK_ERR(shadowfd_unregister(c, page), EINVAL, "no range");
    CHECK(munmap(c, page) == 0);
    CHECK_ERR(shadowfd_mapping_fd(NULL), EINVAL, "NULL");
    shadowfd_shadow_free(sh);
    shadowfd_engine_free(e);
    return 0;
}

/* shadowfd_fill, then shadowfd_read at odd offsets. */
static int case_fill_read(const char *path) {
    shadowfd_engine *e = engine_with(NULL);
    shadowfd_shadow *sh = shadowfd_open_path(e, path);
    CHECK(sh);
    CHECK_OK(shadowfd_fill(sh, page, 2 * page));
    CHECK_OK(shadowfd_fill(sh, 0, want_len));
    char *js = shadowfd_stats_json(sh);
    CHECK(js);
    printf("after fill: %s\n", js);
    shadowfd_string_free(js);
    unsigned char *buf = malloc(want_len);
    CHECK(buf);
    CHECK(shadowfd_read(sh, buf, 1000, 123) == 1000);
    same(buf, 123, 1000, "read at 123");
    CHECK(shadowfd_read(sh, buf, want_len, want_len - 10) == 10);
    same(buf, want_len - 10, 10, "read at the end");
    CHECK(shadowfd_read(sh, buf, 10, want_len) == 0);
    CHECK(shadowfd_read(sh, buf, 0, 0) == 0);
    CHECK_ERR(shadowfd_read(sh, NULL, 10, 0), EINVAL, "buf is NULL");
    CHECK_ERR(shadowfd_read(NULL, buf, 10, 0), EINVAL, "shadow is NULL");
    CHECK_ERR(shadowfd_fill(sh, 0, want_len + 1), ERANGE, "outside");
    free(buf);
    shadowfd_shadow_free(sh);
    shadowfd_engine_free(e);
    return 0;
}

/* materialize, then a plain mmap of shadowfd_fd in a child process. */
static int case_materialize(const char *path) {
    shadowfd_engine *e = engine_with(NULL);
    shadowfd_shadow *sh = shadowfd_open_path(e, path);
    CHECK(sh);
    if (strcmp(mode, "lazy") == 0)
        CHECK_ERR(shadowfd_fd(sh), EBUSY, "materialize");
    CHECK_OK(shadowfd_materialize(sh));
    int fd = shadowfd_fd(sh);
    CHECK_OK(fd);
    int seals = fcntl(fd, F_GET_SEALS);
    CHECK(seals >= 0 && (seals & F_SEAL_WRITE || seals & F_SEAL_FUTURE_WRITE));
    CHECK((fcntl(fd, F_GETFL) & O_ACCMODE) == O_RDONLY);
    /* The shadow and engine can go: the descriptor is the caller's. */
    shadowfd_shadow_free(sh);
    shadowfd_engine_free(e);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        void *p = mmap(NULL, want_len, PROT_READ, MAP_SHARED, fd, 0);
        CHECK(p != MAP_FAILED);
        same(p, 0, want_len, "child's plain mmap of shadowfd_fd");
        _exit(0);
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    close(fd);
    return 0;
}

/* Working sets through the config keys: a run with workset=record leaves
 * one record in workset-dir; a run with workset=replay reads the same bytes;
 * bad values are -EINVAL. */
static int case_workset(const char *path, const char *dir) {
    char wsdir[4096];
    snprintf(wsdir, sizeof wsdir, "%s/worksets-%d", dir, (int)getpid());
    shadowfd_config *c = shadowfd_config_new();
    CHECK(c);
    CHECK_ERR(shadowfd_config_set(c, "workset", "sometimes"), EINVAL, "workset");
    CHECK_ERR(shadowfd_config_set(c, "workset-window", "2 fortnights"), EINVAL,
              "workset-window");
    shadowfd_config_free(c);
    const char *modes[] = {"record", "replay"};
    for (int round = 0; round < 2; round++) {
        const char *kv[] = {"workset", modes[round], "workset-dir", wsdir, NULL};
        shadowfd_engine *e = engine_with(kv);
        shadowfd_shadow *sh = shadowfd_open_path(e, path);
        CHECK(sh);
        void *p = NULL;
        CHECK_OK(shadowfd_map(sh, 0, 0, 0, NULL, &p));
        for (size_t off = 0; off < want_len; off += 7 * page) {
            size_t n = want_len - off < page ? want_len - off : page;
            same((const char *)p + off, off, n, "a page of the mapping");
        }
        CHECK_OK(shadowfd_unmap(p, want_len));
        shadowfd_shadow_free(sh);
        shadowfd_engine_free(e);
    }
    /* Lazy mode recorded one record; eager records nothing. */
    char cmd[4300];
    snprintf(cmd, sizeof cmd, "test \"$(ls %s/*.ws 2>/dev/null | wc -l)\" = %d", wsdir,
             strcmp(mode, "lazy") == 0 ? 1 : 0);
    CHECK(system(cmd) == 0);
    snprintf(cmd, sizeof cmd, "rm -rf %s", wsdir);
    CHECK(system(cmd) == 0);
    return 0;
}

static int64_t null_read(void *ctx, void *buf, size_t len, uint64_t off) {
    (void)ctx;
    (void)buf;
    (void)off;
    return (int64_t)len + 1; /* more than asked: refused */
}

/* Every other error path: a negative errno (or NULL and errno) with a
 * message. */
static int case_errors(const char *path, const char *dir) {
    shadowfd_config *c = shadowfd_config_new();
    CHECK(c);
    CHECK_ERR(shadowfd_config_set(c, "colour", "red"), EINVAL, "max-size");
    CHECK_ERR(shadowfd_config_set(c, "chunk", "12 parsecs"), EINVAL, "--chunk");
    CHECK_ERR(shadowfd_config_set(c, "workers", "many"), EINVAL, "whole number");
    CHECK_ERR(shadowfd_config_set(c, "mode", "fast"), EINVAL, "auto, lazy or eager");
    CHECK_ERR(shadowfd_config_set(c, NULL, "1"), EINVAL, "key is NULL");
    CHECK_ERR(shadowfd_config_set(NULL, "mode", "lazy"), EINVAL, "config is NULL");
    CHECK_OK(shadowfd_config_set(c, "chunk", "3000"));
    errno = 0;
    CHECK(shadowfd_engine_new(c) == NULL);
    CHECK(errno == EINVAL);
    check_message("engine with a 3000-byte chunk", "multiple of the page size");
    CHECK(shadowfd_engine_new(NULL) == NULL);
    check_message("engine_new(NULL)", "NULL");
    CHECK_OK(shadowfd_config_set(c, "chunk", "4K"));
    CHECK_OK(shadowfd_config_set(c, "mode", "eager"));
    CHECK_OK(shadowfd_config_set(c, "max-size", "4K"));
    shadowfd_engine *small = shadowfd_engine_new(c);
    CHECK(small);
    CHECK_NULL(shadowfd_open_path(small, path), EFBIG, "--max-size");
    shadowfd_engine_free(small);
    shadowfd_config_free(c);

    shadowfd_engine *e = engine_with(NULL);
    CHECK_NULL(shadowfd_open_path(e, "/nonexistent/file"), ENOENT, "/nonexistent/file");
    CHECK_NULL(shadowfd_open_path(e, dir), EISDIR, "not a regular file");
    CHECK(shadowfd_open_path(e, NULL) == NULL);
    check_message("open_path(NULL)", "path is NULL");
    CHECK(shadowfd_open_path(NULL, path) == NULL);
    check_message("open_path(NULL engine)", "engine is NULL");
    errno = 0;
    CHECK(shadowfd_open_image(e, path, "/etc/passwd") == NULL);
    CHECK(errno != 0);
    check_message("open_image of a file that is no image", NULL);
    CHECK(shadowfd_open_source(e, NULL, NULL) == NULL);
    check_message("open_source(NULL ops)", "ops is NULL");

    struct src *s = src_new(path);
    shadowfd_source_ops ops = {NULL, src_stat, src_release, 0, NULL};
    CHECK(shadowfd_open_source(e, &ops, s) == NULL);
    check_message("open_source without read_at", "required");
    CHECK(atomic_load(&s->released) == 1);
    shadowfd_source_ops ops2 = {src_read, src_stat, src_release, 0x80, NULL};
    CHECK(shadowfd_open_source(e, &ops2, s) == NULL);
    check_message("open_source with unknown flags", "flags");
    CHECK(atomic_load(&s->released) == 2);

    /* A callback that returns more than it was asked for. */
    shadowfd_source_ops ops3 = {null_read, src_stat, NULL, 0, "liar"};
    shadowfd_shadow *liar = shadowfd_open_source(e, &ops3, s);
    if (strcmp(mode, "lazy") == 0) {
        CHECK(liar);
        char b[8];
        CHECK_ERR(shadowfd_read(liar, b, sizeof b, 0), EIO, "liar");
        shadowfd_shadow_free(liar);
    } else {
        CHECK(liar == NULL);
        check_message("eager open of a lying callback", "liar");
    }

    /* A callback that calls back into the library is refused, not hung. */
    shadowfd_shadow *plain = shadowfd_open_path(e, path);
    CHECK(plain);
    struct src *r = src_new(path);
    r->reenter = plain;
    shadowfd_shadow *re = open_src(e, r, 0);
    char b[16];
    CHECK(shadowfd_read(re, b, sizeof b, 0) == (int64_t)sizeof b);
    CHECK(atomic_load(&r->reenter_result) == -EDEADLK);
    printf("ok: a read inside a callback gave -EDEADLK\n");
    shadowfd_shadow_free(re);
    shadowfd_shadow_free(plain);

    shadowfd_shadow *sh = shadowfd_open_path(e, path);
    CHECK(sh);
    CHECK(shadowfd_stats_json(NULL) == NULL);
    check_message("stats_json(NULL)", "NULL");
    CHECK(shadowfd_engine_stats_json(NULL) == NULL);
    CHECK_ERR(shadowfd_engine_mode(NULL), EINVAL, "NULL");
    CHECK_ERR(shadowfd_fd(NULL), EINVAL, "NULL");
    CHECK_ERR(shadowfd_materialize(NULL), EINVAL, "NULL");
    CHECK_ERR(shadowfd_fill(NULL, 0, 1), EINVAL, "NULL");
    CHECK_ERR(shadowfd_unmap(NULL, page), EINVAL, "no range");
    CHECK(shadowfd_shadow_size(NULL) == 0);
    /* Frees of NULL are no-ops. */
    shadowfd_shadow_free(NULL);
    shadowfd_engine_free(NULL);
    shadowfd_config_free(NULL);
    shadowfd_string_free(NULL);
    CHECK_OK(shadowfd_harden_process());
    shadowfd_shadow_free(sh);
    shadowfd_engine_free(e);
    return 0;
}

int main(int argc, char **argv) {
    start(argc, argv, 4, "CASE FILE MODE [ARG]", 2);
    mode = argv[3];
    const char *c = argv[1];
    if (!strcmp(c, "callback"))
        return case_callback(argv[2]);
    if (!strcmp(c, "eio"))
        return case_eio(argv[2], 5, EIO);
    if (!strcmp(c, "eof"))
        return case_eio(argv[2], 6, 0);
    if (!strcmp(c, "eio-eager"))
        return case_eio_eager(argv[2], 5);
    if (!strcmp(c, "serialized"))
        return case_serialized(argv[2]);
    if (!strcmp(c, "threads"))
        return case_threads(argv[2]);
    if (!strcmp(c, "maps"))
        return case_maps(argv[2]);
    if (!strcmp(c, "register"))
        return case_register(argv[2]);
    if (!strcmp(c, "fill-read"))
        return case_fill_read(argv[2]);
    if (!strcmp(c, "materialize"))
        return case_materialize(argv[2]);
    if (!strcmp(c, "workset"))
        return case_workset(argv[2], argc > 4 ? argv[4] : "/tmp");
    if (!strcmp(c, "errors"))
        return case_errors(argv[2], argc > 4 ? argv[4] : "/");
    fprintf(stderr, "unknown case %s\n", c);
    return 2;
}
