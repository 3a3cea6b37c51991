/* The client half of the C ABI under test: one program, one case per
 * argv[1], each run by a Rust test in ../client.rs against a running
 * `shadowfd serve --socket SOCK --root DIR`. Exit status 0 is a pass;
 * anything else prints why on stderr.
 * Usage: client_test CASE SOCK HOSTFILE NAME SERVER_PID
 * (HOSTFILE is the file's path here, NAME its path on the server.) */
#define _GNU_SOURCE
#include <shadowfd.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"


static shadowfd_client *connect_to(const char *sock) {
    shadowfd_client *c = shadowfd_client_connect(sock);
    if (!c)
        FAIL("shadowfd_client_connect(%s): errno %d", sock, errno);
    return c;
}

static shadowfd_shadow *open_on(shadowfd_client *c, const char *name) {
    shadowfd_shadow *sh = shadowfd_client_open(c, name);
    if (!sh)
        FAIL("shadowfd_client_open(%s): errno %d", name, errno);
    CHECK(shadowfd_shadow_size(sh) == want_len);
    return sh;
}

/* Connects to `sock` (its mode must be `want_mode`), opens `name` and maps
 * it whole, private: the address; the client in *c, the shadow in *sh. */
static void *map_on(const char *sock, const char *name, int want_mode, shadowfd_client **c,
                    shadowfd_shadow **sh) {
    *c = connect_to(sock);
    CHECK(shadowfd_client_mode(*c) == want_mode);
    *sh = open_on(*c, name);
    void *p = NULL;
    CHECK_OK(shadowfd_map(*sh, 0, 0, SHADOWFD_MAP_PRIVATE, NULL, &p));
    return p;
}

/* Maps, reads, fills and asks for stats through a client; every refusal
 * with its errno and message. */
static int case_basic(const char *sock, const char *name, const char *expect_mode) {
    shadowfd_client *c = connect_to(sock);
    int m = shadowfd_client_mode(c);
    printf("client mode: %s\n", m == SHADOWFD_MODE_LAZY ? "lazy" : "eager");
    CHECK(m == (strcmp(expect_mode, "lazy") == 0 ? SHADOWFD_MODE_LAZY : SHADOWFD_MODE_EAGER));
    shadowfd_shadow *sh = open_on(c, name);

    /* The whole file, both flags, len 0 and len = size. */
    void *p = NULL, *q = NULL;
    CHECK_OK(shadowfd_map(sh, 0, 0, SHADOWFD_MAP_PRIVATE, NULL, &p));
    same(p, 0, want_len, "client mapping");
    CHECK_OK(shadowfd_map(sh, 0, want_len, SHADOWFD_MAP_SHARED, NULL, &q));
    CHECK(p != q);
    /* Backwards, page by page, on a second mapping. */
    for (size_t off = (want_len - 1) / page * page;; off -= page) {
        size_t n = want_len - off < page ? want_len - off : page;
        same((const unsigned char *)q + off, off, n, "second client mapping");
        if (off == 0)
            break;
    }
    CHECK_ERR(shadowfd_unmap(q, want_len + page), EINVAL, "not");
    CHECK_OK(shadowfd_unmap(q, want_len));

    /* shadowfd_read: all, a piece across pages, the tail, past the end. */
    unsigned char *buf = malloc(want_len + 100);
    CHECK(buf);
    CHECK(shadowfd_read(sh, buf, want_len + 100, 0) == (int64_t)want_len);
    same(buf, 0, want_len, "shadowfd_read of all");
    CHECK(shadowfd_read(sh, buf, 3 * page, page / 2) == (int64_t)(3 * page));
    same(buf, page / 2, 3 * page, "shadowfd_read across pages");
    CHECK(shadowfd_read(sh, buf, 100, want_len - 10) == 10);
    same(buf, want_len - 10, 10, "shadowfd_read of the tail");
    CHECK(shadowfd_read(sh, buf, 100, want_len) == 0);
    CHECK(shadowfd_read(sh, buf, 0, 0) == 0);
    free(buf);

    /* shadowfd_fill, and its range. */
    CHECK_OK(shadowfd_fill(sh, 0, want_len));
    CHECK_OK(shadowfd_fill(sh, page, 1));
    CHECK_ERR(shadowfd_fill(sh, want_len - 1, 2), ERANGE, "past the end");

    char *js = shadowfd_stats_json(sh);
    CHECK(js && strstr(js, "bytes_filled"));
    printf("stats: %s\n", js);
    shadowfd_string_free(js);

    /* What a client shadow cannot do. */
    CHECK_ERR(shadowfd_map(sh, page, 0, 0, NULL, &q), EOPNOTSUPP, "mapped whole");
    CHECK_ERR(shadowfd_map(sh, 0, page, 0, NULL, &q), EOPNOTSUPP, "mapped whole");
    CHECK_ERR(shadowfd_map(sh, 0, want_len + 1, 0, NULL, &q), ERANGE, "past the end");
    void *res = mmap(NULL, want_len + page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(res != MAP_FAILED);
    CHECK_ERR(shadowfd_map(sh, 0, 0, 0, res, &q), EOPNOTSUPP, "fixed address");
    munmap(res, want_len + page);
    CHECK_ERR(shadowfd_map(sh, 0, 0, 7, NULL, &q), EINVAL, "flags");
    CHECK_ERR(shadowfd_map(sh, 0, 0, 0, NULL, NULL), EINVAL, "out is NULL");
    CHECK_ERR(shadowfd_register(sh, p, want_len, 0), EOPNOTSUPP, "client shadow");
    CHECK_ERR(shadowfd_materialize(sh), EOPNOTSUPP, "client shadow");
    CHECK_ERR(shadowfd_fd(sh), EOPNOTSUPP, "client shadow");
    CHECK_ERR(shadowfd_mapping_fd(sh), EOPNOTSUPP, "client shadow");
    CHECK_ERR(shadowfd_unregister(p, want_len), EINVAL, "shadowfd_unmap");

    /* Files the server refuses. */
    CHECK_NULL(shadowfd_client_open(c, "no/such/file.bin"), ENOENT, "E_NOT_FOUND");
    CHECK_NULL(shadowfd_client_open(c, "../../../etc/passwd"), EACCES, "E_ESCAPE");
    CHECK_NULL(shadowfd_client_open(c, "escape/passwd"), EACCES, "E_ESCAPE");
    CHECK_NULL(shadowfd_client_open(c, "/"), EINVAL, "E_NOT_REGULAR");
    CHECK_NULL(shadowfd_client_open(c, NULL), EINVAL, "path is NULL");
    CHECK_NULL(shadowfd_client_open(NULL, name), EINVAL, "client is NULL");
    CHECK_ERR(shadowfd_client_mode(NULL), EINVAL, "client is NULL");

    /* The connection is still good after the refusals. */
    shadowfd_shadow *again = open_on(c, name);
    unsigned char b2[64];
    CHECK(shadowfd_read(again, b2, sizeof b2, 5) == (int64_t)sizeof b2);
    same(b2, 5, sizeof b2, "read after refusals");
    shadowfd_shadow_free(again);

    /* The mapping outlives its shadow and the client. */
    shadowfd_shadow_free(sh);
    shadowfd_client_free(c);
    same(p, 0, want_len, "client mapping after the shadow and client were freed");
    CHECK_OK(shadowfd_unmap(p, want_len));
    CHECK_ERR(shadowfd_unmap(p, want_len), EINVAL, "no range");

    /* No server there. */
    char nosock[4096];
    snprintf(nosock, sizeof nosock, "%s.absent", sock);
    CHECK_NULL(shadowfd_client_connect(nosock), ENOENT, "shadowfd serve");
    CHECK_NULL(shadowfd_client_connect(NULL), EINVAL, "socket_path is NULL");
    shadowfd_client_free(NULL);
    return 0;
}

/* The server is SIGKILLed after a child mapped (and touched page 0): the
 * child still reads page 0, and touching the last page (never filled)
 * raises SIGBUS there, within a bound. */
static int case_killed(const char *sock, const char *name, pid_t server) {
    int up[2], down[2];
    CHECK(pipe(up) == 0 && pipe(down) == 0);
    size_t last = (want_len - 1) / page;
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        close(up[0]);
        close(down[1]);
        alarm(60); /* a hang ends in SIGALRM, not SIGBUS */
        shadowfd_client *c;
        shadowfd_shadow *sh;
        void *p = map_on(sock, name, SHADOWFD_MODE_LAZY, &c, &sh);
        same(p, 0, page, "page 0 before the kill");
        watch_sigbus(p);
        char x = 'm';
        CHECK(write(up[1], &x, 1) == 1);
        CHECK(read(down[0], &x, 1) == 1); /* the server is dead now */
        same(p, 0, page, "page 0 (filled) after the kill");
        const volatile unsigned char *b = p;
        unsigned char v = b[last * page];
        fprintf(stderr, "FAIL: read %u at page %zu of a killed server's mapping\n", v, last);
        _exit(3);
    }
    close(up[1]);
    close(down[0]);
    char x;
    CHECK(read(up[0], &x, 1) == 1);
    CHECK(kill(server, SIGKILL) == 0);
    printf("server %d SIGKILLed\n", (int)server);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CHECK(write(down[1], &x, 1) == 1);
    int status = 0;
    for (int i = 0;; i++) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        CHECK(r >= 0);
        if (r == pid)
            break;
        if (i > 3000) { /* 30 s */
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            FAIL("the child hung touching an unfilled page of a killed server");
        }
        usleep(10000);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    int want_code = 100 + (int)(last % 100);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != want_code) {
        if (WIFSIGNALED(status))
            FAIL("child killed by signal %d (SIGALRM %d: a hang)", WTERMSIG(status), SIGALRM);
        FAIL("child exit %d, expected %d (SIGBUS at page %zu)", WEXITSTATUS(status), want_code,
             last);
    }
    printf("SIGBUS at page %zu in the child, %.1f ms after the kill\n", last, ms);
    return 0;
}

/* Fails userfaultfd(2) and the /dev/userfaultfd ioctl with EPERM, as a
 * container's seccomp profile does. */
static void deny_userfaultfd(void) {
#if defined(__x86_64__)
    const unsigned arch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
    const unsigned arch = AUDIT_ARCH_AARCH64;
#else
#error "deny_userfaultfd: add this architecture's AUDIT_ARCH"
#endif
    const unsigned ioc_new = 0xAA << 8; /* USERFAULTFD_IOC_NEW: _IO(0xAA, 0) */
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, arch, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_userfaultfd, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_ioctl, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1])),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ioc_new, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {(unsigned short)(sizeof f / sizeof f[0]), f};
    CHECK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0);
    CHECK(prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) == 0);
    errno = 0;
    CHECK(syscall(SYS_userfaultfd, O_CLOEXEC) < 0 && errno == EPERM);
}

/* Where userfaultfd is denied the client gets sealed descriptors: the same
 * bytes, and a complete copy that outlives the server. */
static int case_denied(const char *sock, const char *name, pid_t server) {
    deny_userfaultfd();
    shadowfd_client *c;
    shadowfd_shadow *sh;
    void *p = map_on(sock, name, SHADOWFD_MODE_EAGER, &c, &sh);
    same(p, 0, want_len, "sealed client mapping");
    unsigned char b[100];
    CHECK(shadowfd_read(sh, b, sizeof b, 4 * page) == (int64_t)sizeof b);
    same(b, 4 * page, sizeof b, "read without a userfaultfd");
    CHECK(kill(server, SIGKILL) == 0);
    usleep(200000);
    same(p, 0, want_len, "sealed client mapping after the server was killed");
    /* Requests now fail with an errno, not a signal (SIGPIPE) or a hang. */
    long long r = shadowfd_read(sh, b, sizeof b, 0);
    CHECK(r < 0);
    check_message("shadowfd_read after the server was killed", NULL);
    CHECK_OK(shadowfd_unmap(p, want_len));
    shadowfd_shadow_free(sh);
    shadowfd_client_free(c);
    return 0;
}

/* Without a userfaultfd a file over the server's eager cap is refused:
 * EFBIG at open (an eager server) or at map (a lazy one). */
static int case_too_large(const char *sock, const char *big) {
    deny_userfaultfd();
    shadowfd_client *c = connect_to(sock);
    CHECK(shadowfd_client_mode(c) == SHADOWFD_MODE_EAGER);
    errno = 0;
    shadowfd_shadow *sh = shadowfd_client_open(c, big);
    if (!sh) {
        CHECK(errno == EFBIG);
        check_message("shadowfd_client_open of a file over the eager cap", "E_TOO_LARGE");
    } else {
        void *p = NULL;
        CHECK_ERR(shadowfd_map(sh, 0, 0, 0, NULL, &p), EFBIG, "E_TOO_LARGE");
        /* Reading needs no sealed copy. */
        unsigned char b[10];
        CHECK(shadowfd_read(sh, b, sizeof b, 0) == (int64_t)sizeof b);
        shadowfd_shadow_free(sh);
    }
    shadowfd_client_free(c);
    return 0;
}

/* Four threads map, check, read and unmap through one client at once,
 * each with its own shadowfd_last_error. */
struct worker {
    shadowfd_client *c;
    const char *name;
    int id;
};

static void *work(void *arg) {
    struct worker *w = arg;
    for (int i = 0; i < 20; i++) {
        shadowfd_shadow *sh = open_on(w->c, w->name);
        void *p = NULL;
        CHECK_OK(shadowfd_map(sh, 0, 0, SHADOWFD_MAP_PRIVATE, NULL, &p));
        size_t off = ((size_t)(w->id * 7 + i) * page) % want_len;
        size_t n = want_len - off < page ? want_len - off : page;
        same((const unsigned char *)p + off, off, n, "threaded mapping");
        unsigned char b[256];
        size_t at = (off + 100) % want_len;
        int64_t r = shadowfd_read(sh, b, sizeof b, at);
        CHECK(r == (int64_t)(want_len - at < sizeof b ? want_len - at : sizeof b));
        same(b, at, (size_t)r, "threaded read");
        CHECK_ERR(shadowfd_fd(sh), EOPNOTSUPP, "client shadow");
        CHECK_OK(shadowfd_unmap(p, want_len));
        shadowfd_shadow_free(sh);
        CHECK(shadowfd_client_open(w->c, "missing") == NULL && errno == ENOENT);
        CHECK(strstr(shadowfd_last_error(), "missing") != NULL);
    }
    return NULL;
}

static int case_threads(const char *sock, const char *name) {
    shadowfd_client *c = connect_to(sock);
    pthread_t t[4];
    struct worker w[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (struct worker){c, name, i};
        CHECK(pthread_create(&t[i], NULL, work, &w[i]) == 0);
    }
    for (int i = 0; i < 4; i++)
        CHECK(pthread_join(t[i], NULL) == 0);
    shadowfd_client_free(c);
    return 0;
}

int main(int argc, char **argv) {
    start(argc, argv, 6, "CASE SOCK HOSTFILE NAME SERVER_PID [MODE]", 3);
    const char *c = argv[1], *sock = argv[2], *name = argv[4];
    pid_t server = (pid_t)atol(argv[5]);
    if (!strcmp(c, "basic"))
        return case_basic(sock, name, argc > 6 ? argv[6] : "lazy");
    if (!strcmp(c, "killed"))
        return case_killed(sock, name, server);
    if (!strcmp(c, "denied"))
        return case_denied(sock, name, server);
    if (!strcmp(c, "too-large"))
        return case_too_large(sock, argc > 6 ? argv[6] : "big.bin");
    if (!strcmp(c, "threads"))
        return case_threads(sock, name);
    fprintf(stderr, "unknown case %s\n", c);
    return 2;
}
