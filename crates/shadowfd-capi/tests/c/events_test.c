/* What a program does with a lazy mapping after it has one: move it, grow
 * it, fork, discard pages, cut it up. Every page must read as the source's
 * bytes (never zeros), and a page past the end of the file raises SIGBUS as
 * under a file mapping.
 *
 *   events_test KIND SHARE SCENARIO TARGET REF
 *
 * KIND: capi (shadowfd_map on a local engine), capi-fixed (the same at a
 * fixed address), capi-reg (the caller's mmap of shadowfd_mapping_fd, then
 * shadowfd_register), client (shadowfd_client_*
 * through `shadowfd serve`; TARGET is SOCKET:PATH) or plain (open + mmap of
 * TARGET: a path `shadowfd run` serves). SHARE: shared or private. REF: the
 * same bytes as a host file, read with read(2). Exits 0 if every check held.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "shadowfd.h"

#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif

static size_t page;
static unsigned char *ref;
static size_t size;
static int failures;

#define FAIL(...)                                                                \
    do {                                                                         \
        fprintf(stderr, "FAIL: " __VA_ARGS__);                                   \
        fputc('\n', stderr);                                                     \
        failures++;                                                              \
    } while (0)

/* Per thread: SIGBUS is delivered to the thread that touched the page. */
static __thread sigjmp_buf jump;
static __thread volatile sig_atomic_t bus;

static void on_bus(int sig) {
    (void)sig;
    bus = 1;
    siglongjmp(jump, 1);
}

/* Reads byte `i` of `p`; returns -1 on SIGBUS. */
static int peek(const volatile unsigned char *p, size_t i) {
    bus = 0;
    if (sigsetjmp(jump, 1))
        return -1;
    return p[i];
}

/* Checks that `p` shows the file from `off` for `len` bytes, page by page;
 * `what` names the view. Returns the number of bad pages. */
static int check(const unsigned char *p, size_t off, size_t len, const char *what) {
    int bad = 0;
    for (size_t at = 0; at < len; at += page) {
        size_t n = len - at < page ? len - at : page;
        int first = peek(p, at);
        if (first < 0) {
            if (bad++ < 3)
                FAIL("%s: SIGBUS at byte %zu (file offset %zu)", what, at, off + at);
            continue;
        }
        if (memcmp(p + at, ref + off + at, n) != 0) {
            size_t z = 0;
            while (z < n && p[at + z] == 0)
                z++;
            if (bad++ < 3)
                FAIL("%s: wrong bytes in the page at %zu (file offset %zu)%s", what, at,
                     off + at, z == n ? ": all zeros" : "");
        }
    }
    return bad;
}

static int shared_flag;
static const char *kind;
static struct shadowfd_engine *engine;
static struct shadowfd_client *client;
static const char *target;

/* Copies of the file the stress maps (scenario stressSxN); 0: the file. */
static int stress_files;

/* Held while a library mapping is made, and by a move from its mremap
 * until the moved mapping is handed back at its old address
 * (shadowfd_unmap's rule: before the old address can be mapped again). */
static pthread_mutex_t reuse_lock = PTHREAD_MUTEX_INITIALIZER;

static size_t round_page(size_t n) { return (n + page - 1) / page * page; }

/* A fresh mapping of `len` bytes from offset 0. */
static unsigned char *map_len(size_t len) {
    /* stress_files N: one of N copies of the file, TARGET.0 .. TARGET.N-1,
     * picked at random (a server shares one shadow per file and serves it
     * sealed once it is whole: many files under a small memory budget keep
     * its mappings lazy). */
    char path[4096];
    const char *name = strchr(target, ':') && client ? strchr(target, ':') + 1 : target;
    if (stress_files > 0) {
        static __thread unsigned pick_seed;
        if (!pick_seed)
            pick_seed = (unsigned)(uintptr_t)&pick_seed;
        snprintf(path, sizeof path, "%s.%d", name, (int)(rand_r(&pick_seed) % (unsigned)stress_files));
        name = path;
    }
    if (!strcmp(kind, "plain")) {
        int fd = open(name, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            perror(name);
            exit(2);
        }
        void *p = mmap(NULL, len, PROT_READ, shared_flag ? MAP_SHARED : MAP_PRIVATE, fd, 0);
        close(fd);
        if (p == MAP_FAILED) {
            perror("mmap");
            exit(2);
        }
        return p;
    }
    struct shadowfd_shadow *s;
    if (engine)
        s = shadowfd_open_path(engine, name);
    else
        s = shadowfd_client_open(client, name);
    if (!s) {
        fprintf(stderr, "open %s: %s\n", name, shadowfd_last_error());
        exit(2);
    }
    void *p = NULL;
    int flags = shared_flag ? SHADOWFD_MAP_SHARED : SHADOWFD_MAP_PRIVATE;
    /* A client shadow is mapped whole (length 0). */
    pthread_mutex_lock(&reuse_lock);
    int r;
    if (!strcmp(kind, "capi-fixed")) {
        /* At a fixed address: a reservation of ours, mapped over. */
        void *at = mmap(NULL, round_page(len), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        r = at == MAP_FAILED ? -errno : shadowfd_map(s, 0, len, flags, at, &p);
    } else if (!strcmp(kind, "capi-reg")) {
        /* The caller's own mapping of the shadow, registered. */
        void *at = mmap(NULL, len, PROT_READ, shared_flag ? MAP_SHARED : MAP_PRIVATE, shadowfd_mapping_fd(s), 0);
        r = at == MAP_FAILED ? -errno : shadowfd_register(s, at, len, 0);
        p = at;
    } else {
        r = shadowfd_map(s, 0, client ? 0 : len, flags, NULL, &p);
    }
    pthread_mutex_unlock(&reuse_lock);
    if (r != 0) {
        fprintf(stderr, "shadowfd_map: %d %s\n", r, shadowfd_last_error());
        exit(2);
    }
    shadowfd_shadow_free(s);
    return p;
}


/* A mapping of the first `first` bytes: a client maps whole files, so its
 * mapping is shrunk to that (the kernel cuts the tail: an UNMAP event). */
static unsigned char *map_first(size_t first, size_t whole) {
    if (!client)
        return map_len(first);
    unsigned char *p = map_len(whole);
    unsigned char *q = mremap(p, whole, first, 0);
    if (q == MAP_FAILED) {
        perror("mremap shrink");
        exit(2);
    }
    return q;
}

/* Runs `f` in a child made by `how` ("fork" or "raw"); its exit status is
 * the number of bad pages it saw (0: all good). */
static int in_child(const char *how, int (*f)(void *), void *arg) {
    fflush(NULL);
    pid_t pid = !strcmp(how, "raw") ? (pid_t)syscall(SYS_fork) : fork();
    if (pid < 0) {
        perror("fork");
        exit(2);
    }
    if (pid == 0)
        _exit(f(arg) ? 1 : 0);
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    if (!WIFEXITED(st)) {
        FAIL("%s child ended by signal %d", how, WIFSIGNALED(st) ? WTERMSIG(st) : -1);
        return 1;
    }
    return WEXITSTATUS(st);
}

static unsigned char *child_view;

static int child_checks(void *arg) {
    (void)arg;
    return check(child_view, 0, size, "child");
}

static int grandchild_checks(void *arg) {
    (void)arg;
    /* The child touches a few pages itself first, then forks again. */
    for (size_t at = 0; at < size; at += 7 * page)
        (void)peek(child_view, at);
    return in_child("fork", child_checks, NULL);
}

/* ---- stress: threads moving, forking and cutting fresh mappings ---- */


#include <dirent.h>
#include <time.h>

static volatile int stop_stress;
static int stress_bad;
static long stress_ops[8];
static pthread_mutex_t stress_lock = PTHREAD_MUTEX_INITIALIZER;

/* Open descriptors, but for the shim's one empty sealed memfd (made once,
 * at the first fork or mapping past the end of a file, and kept). */
static int count_fds(void) {
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    if (!d)
        return -1;
    while ((e = readdir(d))) {
        char path[300], to[300];
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        ssize_t k = readlink(path, to, sizeof to - 1);
        if (k > 0) {
            to[k] = 0;
            if (strstr(to, "shadowfd-past-eof"))
                continue;
        }
        n++;
    }
    closedir(d);
    return n;
}

/* Names every open descriptor on stderr (what a leak left behind). */
static void show_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        char path[300], to[300];
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        ssize_t n = readlink(path, to, sizeof to - 1);
        if (n > 0) {
            to[n] = 0;
            fprintf(stderr, "  fd %s -> %s\n", e->d_name, to);
        }
    }
    if (d)
        closedir(d);
}

static __thread const char *stress_op;

/* Like check() but quiet and per thread: 1 if any page is wrong or raises
 * SIGBUS (named on stderr with the operation). */
static int quiet_check(const unsigned char *p, size_t off, size_t len) {
    for (size_t at = 0; at < len; at += page) {
        size_t n = len - at < page ? len - at : page;
        if (peek(p, at) < 0) {
            fprintf(stderr, "stress: SIGBUS at file offset %zu (%p) after %s\n", off + at,
                    (void *)(p + at), stress_op);
            return 1;
        }
        if (memcmp(p + at, ref + off + at, n) != 0) {
            fprintf(stderr, "stress: wrong bytes at file offset %zu (%p) after %s\n", off + at,
                    (void *)(p + at), stress_op);
            return 1;
        }
    }
    return 0;
}

static void *stress_thread(void *arg) {
    long me = (long)arg;
    unsigned seed = (unsigned)me * 7919u + 1;
    size_t whole = round_page(size);
    while (!stop_stress) {
        unsigned char *p = map_len(size);
        unsigned char *orig = p;
        int bad = 0;
        static int mask = -1;
        if (mask < 0)
            mask = getenv("STRESS_OPS") ? atoi(getenv("STRESS_OPS")) : 31;
        int op;
        do
            op = rand_r(&seed) % 5;
        while (!(mask & (1 << op)));
        static const char *names[] = {"a move", "a fork", "MADV_DONTNEED", "a cut", "a read"};
        stress_op = names[op];
        switch (op) {
        case 0: /* move */ {
            void *to = mmap(NULL, whole, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            pthread_mutex_lock(&reuse_lock);
            unsigned char *q = mremap(p, whole, whole, MREMAP_MAYMOVE | MREMAP_FIXED, to);
            if (q != MAP_FAILED) {
                /* Handed back at once: what moved stays ours to unmap. */
                if (strcmp(kind, "plain") && shadowfd_unmap(orig, whole) != 0) {
                    fprintf(stderr, "stress: shadowfd_unmap after a move: %s\n", shadowfd_last_error());
                    bad = 1;
                }
                orig = NULL;
            }
            pthread_mutex_unlock(&reuse_lock);
            bad |= q == MAP_FAILED || quiet_check(q, 0, size);
            p = q == MAP_FAILED ? p : q;
            break;
        }
        case 1: /* fork, the child checks */ {
            pid_t pid = fork();
            if (pid == 0)
                _exit(quiet_check(p, 0, size));
            int st = 0;
            waitpid(pid, &st, 0);
            /* A client's mappings stay out of children (MADV_DONTFORK,
             * docs/remote.md): its child faults with SIGSEGV, never reads
             * wrong bytes. */
            int gone = client && WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV;
            bad = !gone && (!WIFEXITED(st) || WEXITSTATUS(st) != 0);
            break;
        }
        case 2: /* discard, then read again */
            bad = quiet_check(p, 0, size / 2);
            madvise(p, whole, MADV_DONTNEED);
            bad |= quiet_check(p, 0, size);
            break;
        case 3: /* cut the middle out */ {
            size_t third = round_page(size / 3);
            munmap(p + third, third);
            bad = quiet_check(p, 0, third) || quiet_check(p + 2 * third, 2 * third, size - 2 * third);
            p = NULL;
            break;
        }
        default: /* just read */
            bad = quiet_check(p, 0, size);
        }
        /* Whatever is left where it was moved to goes with munmap; the
         * mapping itself is handed back to the library, which unmaps only
         * what is still its own. */
        if (p && p != orig)
            munmap(p, whole);
        if (!orig)
            ; /* handed back already */
        else if (!strcmp(kind, "plain"))
            munmap(orig, whole);
        else if (shadowfd_unmap(orig, whole) != 0) {
            fprintf(stderr, "stress: shadowfd_unmap after %s: %s\n", stress_op, shadowfd_last_error());
            bad = 1;
        }
        pthread_mutex_lock(&stress_lock);
        stress_bad += bad;
        stress_ops[me]++;
        pthread_mutex_unlock(&stress_lock);
    }
    return NULL;
}

static int stress(int seconds) {
    /* One mapping first: what stays open for good after it (the shim's
     * connection, userfaultfd and eventfds under `shadowfd run`) is not a
     * leak. */
    {
        unsigned char *p = map_len(size);
        if (!strcmp(kind, "plain"))
            munmap(p, round_page(size));
        else
            shadowfd_unmap(p, round_page(size));
    }
    int fds0 = count_fds();
    pthread_t t[8];
    for (long i = 0; i < 8; i++)
        pthread_create(&t[i], NULL, stress_thread, (void *)i);
    sleep((unsigned)seconds);
    stop_stress = 1;
    long ops = 0;
    for (int i = 0; i < 8; i++) {
        pthread_join(t[i], NULL);
        ops += stress_ops[i];
    }
    /* Children's userfaultfds are let go within a second of their exit. */
    int fds1 = count_fds();
    for (int i = 0; i < 40 && fds1 > fds0; i++) {
        usleep(100000);
        fds1 = count_fds();
    }
    printf("stress: %ld operations by 8 threads in %d s, %d wrong, descriptors %d -> %d\n", ops,
           seconds, stress_bad, fds0, fds1);
    if (stress_bad)
        FAIL("%d operations saw wrong bytes", stress_bad);
    if (fds1 > fds0) {
        FAIL("descriptors leaked: %d before, %d after", fds0, fds1);
        show_fds();
    }
    if (ops < 8)
        FAIL("only %ld operations ran", ops);
    return failures;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: events_test KIND SHARE SCENARIO TARGET REF\n");
        return 2;
    }
    page = (size_t)sysconf(_SC_PAGESIZE);
    kind = argv[1];
    shared_flag = !strcmp(argv[2], "shared");
    const char *scenario = argv[3];
    target = argv[4];
    int rfd = open(argv[5], O_RDONLY);
    struct stat st;
    if (rfd < 0 || fstat(rfd, &st) != 0) {
        perror(argv[5]);
        return 2;
    }
    size = (size_t)st.st_size;
    ref = malloc(size + 1);
    for (size_t got = 0; got < size;) {
        ssize_t n = read(rfd, ref + got, size - got);
        if (n <= 0) {
            perror("read ref");
            return 2;
        }
        got += (size_t)n;
    }
    close(rfd);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_bus;
    sa.sa_flags = SA_NODEFER;
    sigaction(SIGBUS, &sa, NULL);

    if (!strncmp(kind, "capi", 4)) {
        struct shadowfd_config *c = shadowfd_config_new();
        shadowfd_config_set(c, "mode", getenv("EVENTS_MODE") ? getenv("EVENTS_MODE") : "lazy");
        engine = shadowfd_engine_new(c);
        shadowfd_config_free(c);
        if (!engine) {
            fprintf(stderr, "engine: %s\n", shadowfd_last_error());
            return 2;
        }
    } else if (!strcmp(kind, "client")) {
        char sock[4096];
        const char *colon = strchr(target, ':');
        snprintf(sock, sizeof sock, "%.*s", (int)(colon - target), target);
        client = shadowfd_client_connect(sock);
        if (!client) {
            fprintf(stderr, "connect: %s\n", shadowfd_last_error());
            return 2;
        }
    }
    size_t whole = round_page(size);

    /* stressS or stressSxN: S seconds over one file, or over N copies. */
    if (!strncmp(scenario, "stress", 6)) {
        int secs = atoi(scenario + 6);
        const char *x = strchr(scenario, 'x');
        if (x)
            stress_files = atoi(x + 1);
        return stress(secs > 0 ? secs : 30) ? 1 : 0;
    }
    if (!strcmp(scenario, "move")) {
        unsigned char *p = map_len(size);
        void *dst = mmap(NULL, whole, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        unsigned char *q = mremap(p, whole, whole, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
        if (q == MAP_FAILED)
            FAIL("mremap move: %s", strerror(errno));
        else
            check(q, 0, size, "moved");
    } else if (!strcmp(scenario, "grow")) {
        size_t first = round_page(size / 2);
        unsigned char *p = map_first(first, whole);
        /* Something right after it, so that the grow must move. */
        void *block = mmap(p + first, page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        unsigned char *q = mremap(p, first, whole, MREMAP_MAYMOVE);
        if (q == MAP_FAILED)
            FAIL("mremap grow: %s", strerror(errno));
        else
            check(q, 0, size, "grown and moved");
        if (block != MAP_FAILED)
            munmap(block, page);
    } else if (!strcmp(scenario, "grow-in-place")) {
        size_t first = round_page(size / 2);
        unsigned char *p = map_first(first, whole);
        unsigned char *q = mremap(p, first, whole, 0);
        if (q == MAP_FAILED) {
            /* The kernel put the mapping elsewhere: grow with a move. */
            q = mremap(p, first, whole, MREMAP_MAYMOVE);
        }
        if (q == MAP_FAILED)
            FAIL("mremap grow: %s", strerror(errno));
        else
            check(q, 0, size, "grown");
    } else if (!strcmp(scenario, "grow-past-eof")) {
        unsigned char *p = map_len(size);
        unsigned char *q = mremap(p, whole, whole + 2 * page, MREMAP_MAYMOVE);
        if (q == MAP_FAILED) {
            FAIL("mremap grow past the end: %s", strerror(errno));
        } else {
            check(q, 0, size, "grown past the end");
            if (peek(q, whole) != -1 || peek(q, whole + page) != -1)
                FAIL("a page past the end of the file did not raise SIGBUS");
        }
    } else if (!strcmp(scenario, "dontunmap")) {
        unsigned char *p = map_len(size);
        unsigned char *q = mremap(p, whole, whole, MREMAP_MAYMOVE | MREMAP_DONTUNMAP);
        if (q == MAP_FAILED) {
            if (errno == EINVAL) {
                printf("SKIP: MREMAP_DONTUNMAP refused here (EINVAL)\n");
                return 0;
            }
            FAIL("mremap DONTUNMAP: %s", strerror(errno));
        } else {
            check(q, 0, size, "moved (DONTUNMAP)");
            check(p, 0, size, "kept (DONTUNMAP)");
        }
    } else if (!strcmp(scenario, "rawfork") && !engine) {
        /* A remote mapping is MADV_DONTFORK (docs/remote.md): a raw fork's
         * child has none there (SIGSEGV), never zeros. */
        unsigned char *p = map_len(size);
        child_view = p;
        fflush(NULL);
        pid_t pid = (pid_t)syscall(SYS_fork);
        if (pid == 0)
            _exit(child_checks(NULL) ? 1 : 0);
        int st = 0;
        waitpid(pid, &st, 0);
        if (!WIFSIGNALED(st) || WTERMSIG(st) != SIGSEGV)
            FAIL("a raw fork's child read a remote mapping (status %d)", st);
        check(p, 0, size, "parent after the fork");
    } else if (!strcmp(scenario, "fork") || !strcmp(scenario, "rawfork")) {
        unsigned char *p = map_len(size);
        madvise(p, whole, MADV_DOFORK);
        /* A few pages filled before, most not. */
        for (size_t at = 0; at < size; at += 5 * page)
            (void)peek(p, at);
        child_view = p;
        if (in_child(!strcmp(scenario, "rawfork") ? "raw" : "fork", child_checks, NULL))
            FAIL("the forked child saw wrong bytes");
        check(p, 0, size, "parent after the fork");
    } else if (!strcmp(scenario, "fork-again")) {
        unsigned char *p = map_len(size);
        /* A remote mapping goes to children only where its user asks. */
        madvise(p, whole, MADV_DOFORK);
        child_view = p;
        if (in_child("fork", grandchild_checks, NULL))
            FAIL("a child's child saw wrong bytes");
        check(p, 0, size, "parent after the forks");
    } else if (!strcmp(scenario, "orphan")) {
        /* The parent fills the first half and exits while its child still
         * maps the file: every page the child reads afterwards is exact or
         * raises SIGBUS, never zeros. The child writes what it saw to
         * REF.orphan (the test waits for it). */
        unsigned char *p = map_len(size);
        madvise(p, whole, MADV_DOFORK);
        check(p, 0, page, "parent's first page");
        pid_t parent = getpid();
        fflush(NULL);
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 2;
        }
        if (pid > 0)
            exit(failures ? 1 : 0); /* with its exit handlers */
        for (int i = 0; i < 1000 && getppid() == parent; i++)
            usleep(10000);
        size_t exact = 0, bus = 0, wrong = 0;
        for (size_t at = 0; at < size; at += page) {
            size_t n = size - at < page ? size - at : page;
            if (peek(p, at) < 0)
                bus++;
            else if (memcmp(p + at, ref + at, n) == 0)
                exact++;
            else
                wrong++;
        }
        char out[4200];
        snprintf(out, sizeof out, "%s.orphan", argv[5]);
        FILE *f = fopen(out, "w");
        if (f) {
            fprintf(f, "parent-gone %d exact %zu sigbus %zu wrong %zu\n", getppid() != parent,
                    exact, bus, wrong);
            fclose(f);
        }
        _exit(0);
    } else if (!strcmp(scenario, "vfork")) {
        unsigned char *p = map_len(size);
        for (size_t at = 0; at < size; at += 3 * page)
            (void)peek(p, at);
        pid_t pid = vfork();
        if (pid == 0) {
            execl("/bin/true", "true", (char *)NULL);
            _exit(127);
        }
        int s = 0;
        waitpid(pid, &s, 0);
        if (!WIFEXITED(s) || WEXITSTATUS(s) != 0)
            FAIL("vfork + exec of /bin/true failed");
        check(p, 0, size, "parent after vfork + exec");
    } else if (!strcmp(scenario, "dontneed")) {
        unsigned char *p = map_len(size);
        check(p, 0, size / 2, "first half");
        if (madvise(p, whole, MADV_DONTNEED) != 0)
            FAIL("madvise(MADV_DONTNEED): %s", strerror(errno));
        check(p, 0, size, "after MADV_DONTNEED");
    } else if (!strcmp(scenario, "munmap")) {
        unsigned char *p = map_len(size);
        size_t third = round_page(size / 3);
        munmap(p + third, third);
        check(p, 0, third, "head after cutting the middle");
        check(p + 2 * third, 2 * third, size - 2 * third, "tail after cutting the middle");
        munmap(p, third);
        check(p + 2 * third, 2 * third, size - 2 * third, "tail after cutting the head");
    } else {
        fprintf(stderr, "unknown scenario %s\n", scenario);
        return 2;
    }
    if (failures) {
        fprintf(stderr, "%s %s %s: %d failure(s)\n", kind, argv[2], scenario, failures);
        return 1;
    }
    printf("ok %s %s %s\n", kind, argv[2], scenario);
    return 0;
}
