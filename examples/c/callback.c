/* A minimal embedding of libshadowfd with a callback source.
 *
 * The "file" here is synthesized by a function of the offset, as an
 * in-process kernel or a network store would hand out bytes: the program
 * shadows it, maps it lazily (each page is produced by the callback on
 * first touch), checks a checksum and prints the engine's counters.
 *
 * Build: make -C examples/c   (after cargo build --release at the root)
 * Run:   examples/c/callback [SIZE_IN_BYTES]
 */
#define _GNU_SOURCE
#include <shadowfd.h>

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct guest_file {
    uint64_t size;
    unsigned long reads; /* the source is serialized: no lock needed */
};

static unsigned char byte_at(uint64_t off) { return (unsigned char)(off * 2654435761u >> 13); }

/* Called on a fault-service thread when bytes are needed. Returns the count
 * or a negative errno; never touches a lazy mapping (see shadowfd.h). */
static int64_t guest_read(void *ctx, void *buf, size_t len, uint64_t off) {
    struct guest_file *g = ctx;
    g->reads++;
    if (off >= g->size)
        return 0;
    if (len > g->size - off)
        len = (size_t)(g->size - off);
    unsigned char *b = buf;
    for (size_t i = 0; i < len; i++)
        b[i] = byte_at(off + i);
    return (int64_t)len;
}

static int guest_stat(void *ctx, shadowfd_meta *out) {
    struct guest_file *g = ctx;
    memset(out, 0, sizeof *out);
    out->size = g->size; /* the same every time: the file never changes */
    out->inode = 1;
    return 0;
}

static void guest_release(void *ctx) {
    struct guest_file *g = ctx;
    printf("release: the library is done with the source after %lu reads\n", g->reads);
    free(g);
}

static int fail(const char *what) {
    const char *m = shadowfd_last_error();
    fprintf(stderr, "%s: %s\n", what, m ? m : strerror(errno));
    return 1;
}

int main(int argc, char **argv) {
    uint64_t size = argc > 1 ? strtoull(argv[1], NULL, 0) : (3u << 20) + 123;

    shadowfd_config *cfg = shadowfd_config_new(); /* defaults + SHADOWFD_* */
    if (!cfg)
        return fail("shadowfd_config_new");
    if (shadowfd_config_set(cfg, "memory-budget", "256M") < 0)
        return fail("shadowfd_config_set");
    shadowfd_engine *engine = shadowfd_engine_new(cfg);
    shadowfd_config_free(cfg);
    if (!engine)
        return fail("shadowfd_engine_new");
    printf("mode: %s\n", shadowfd_engine_mode(engine) == SHADOWFD_MODE_LAZY ? "lazy" : "eager");

    struct guest_file *g = calloc(1, sizeof *g);
    if (!g)
        return 1;
    g->size = size;
    shadowfd_source_ops ops = {
        .read_at = guest_read,
        .stat = guest_stat,
        .release = guest_release,
        .flags = SHADOWFD_SOURCE_SERIALIZED,
        .name = "guest:/data/blob",
    };
    /* g belongs to the library from here on, even if this fails. */
    shadowfd_shadow *shadow = shadowfd_open_source(engine, &ops, g);
    if (!shadow)
        return fail("shadowfd_open_source");

    void *p;
    if (shadowfd_map(shadow, 0, 0, SHADOWFD_MAP_PRIVATE, NULL, &p) < 0)
        return fail("shadowfd_map");
    const unsigned char *bytes = p;
    uint64_t sum = 0, want = 0;
    for (uint64_t i = 0; i < size; i++) {
        sum += bytes[i] * (i % 7 + 1);
        want += byte_at(i) * (i % 7 + 1);
    }
    printf("checksum %llu (%s)\n", (unsigned long long)sum, sum == want ? "matches" : "WRONG");

    char *stats = shadowfd_stats_json(shadow);
    if (stats) {
        printf("stats: %s\n", stats);
        shadowfd_string_free(stats);
    }
    shadowfd_shadow_free(shadow);
    shadowfd_engine_free(engine);
    if (shadowfd_unmap(p, size) < 0) /* the last user: release runs now */
        return fail("shadowfd_unmap");
    return sum == want ? 0 : 1;
}
