/* An in-process sandbox loading a guest ELF the way a guest's ld.so would:
 * reserve the image's address range, then mmap(MAP_FIXED) each PT_LOAD
 * segment from its page-aligned file offset, and register each mapping
 * with shadowfd so that its pages are filled from the file on first touch.
 *
 * The guest maps the shadow's descriptor itself (shadowfd_mapping_fd), as
 * a guest mmap syscall forwarded by the sandbox would; shadowfd_register
 * hands the range to the engine. Segments stay PROT_READ here (a register
 * takes a read-only mapping); a real sandbox would mprotect afterwards.
 *
 * Build: make -C examples/c   (after cargo build --release at the root)
 * Run:   examples/c/sandbox [ELF_FILE]   (default: this program)
 */
#define _GNU_SOURCE
#include <shadowfd.h>

#include <elf.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int fail(const char *what) {
    const char *m = shadowfd_last_error();
    fprintf(stderr, "%s: %s\n", what, m ? m : strerror(errno));
    return 1;
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "/proc/self/exe";
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);

    /* The sandbox's own choice: keep other processes of this uid out. */
    if (shadowfd_harden_process() < 0)
        return fail("shadowfd_harden_process");
    shadowfd_config *cfg = shadowfd_config_new();
    if (!cfg)
        return fail("shadowfd_config_new");
    shadowfd_engine *engine = shadowfd_engine_new(cfg);
    shadowfd_config_free(cfg);
    if (!engine)
        return fail("shadowfd_engine_new");
    shadowfd_shadow *elf = shadowfd_open_path(engine, path);
    if (!elf)
        return fail("shadowfd_open_path");
    uint64_t size = shadowfd_shadow_size(elf);

    /* The headers, read through the shadow. */
    Elf64_Ehdr eh;
    if (shadowfd_read(elf, &eh, sizeof eh, 0) != (int64_t)sizeof eh ||
        memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0 || eh.e_ident[EI_CLASS] != ELFCLASS64) {
        fprintf(stderr, "%s: not a 64-bit ELF file\n", path);
        return 1;
    }
    Elf64_Phdr *ph = calloc(eh.e_phnum, sizeof *ph);
    if (!ph)
        return 1;
    int64_t want = (int64_t)eh.e_phnum * (int64_t)sizeof *ph;
    if (shadowfd_read(elf, ph, (size_t)want, eh.e_phoff) != want)
        return fail("reading the program headers");

    /* The span of the loadable segments, reserved PROT_NONE as ld.so does. */
    uint64_t lo = UINT64_MAX, hi = 0;
    for (int i = 0; i < eh.e_phnum; i++) {
        if (ph[i].p_type != PT_LOAD)
            continue;
        uint64_t s = ph[i].p_vaddr & ~(page - 1);
        uint64_t e = (ph[i].p_vaddr + ph[i].p_memsz + page - 1) & ~(page - 1);
        lo = s < lo ? s : lo;
        hi = e > hi ? e : hi;
    }
    if (lo >= hi) {
        fprintf(stderr, "%s: no PT_LOAD segment\n", path);
        return 1;
    }
    unsigned char *base = mmap(NULL, hi - lo, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        return fail("reserving the image");

    int mfd = shadowfd_mapping_fd(elf);
    if (mfd < 0)
        return fail("shadowfd_mapping_fd");
    int bad = 0;
    for (int i = 0; i < eh.e_phnum; i++) {
        if (ph[i].p_type != PT_LOAD || ph[i].p_filesz == 0)
            continue;
        uint64_t skew = ph[i].p_offset & (page - 1);
        uint64_t off = ph[i].p_offset - skew;
        size_t len = (size_t)(ph[i].p_filesz + skew);
        unsigned char *at = base + ((ph[i].p_vaddr & ~(page - 1)) - lo);
        /* The guest's mmap: fixed, private, at the segment's file offset. */
        void *m = mmap(at, len, PROT_READ, MAP_PRIVATE | MAP_FIXED, mfd, (off_t)off);
        if (m != at)
            return fail("mmap(MAP_FIXED) of a segment");
        if (shadowfd_register(elf, m, len, off) < 0)
            return fail("shadowfd_register");
        /* The guest touches it: each page is filled from the file on
         * first touch. Compare with the same bytes read through shadowfd. */
        unsigned char *touched = malloc(len), *copy = malloc(len);
        if (!touched || !copy)
            return 1;
        memcpy(touched, m, len);
        if (shadowfd_read(elf, copy, len, off) != (int64_t)len)
            return fail("shadowfd_read of the segment");
        int same = memcmp(touched, copy, len) == 0;
        free(touched);
        bad |= !same;
        printf("PT_LOAD %d: vaddr %#llx, file %#llx+%zu -> %p: %s\n", i,
               (unsigned long long)ph[i].p_vaddr, (unsigned long long)off, len, m,
               same ? "bytes match" : "BYTES DIFFER");
        free(copy);
        /* Unregister and unmap (a real sandbox would keep it while the
         * guest runs); the hole it leaves in the reservation goes below. */
        if (shadowfd_unmap(m, len) < 0)
            return fail("shadowfd_unmap");
    }
    munmap(base, hi - lo);
    char *stats = shadowfd_stats_json(elf);
    if (stats) {
        printf("%s (%llu bytes) stats: %s\n", path, (unsigned long long)size, stats);
        shadowfd_string_free(stats);
    }
    free(ph);
    shadowfd_shadow_free(elf);
    shadowfd_engine_free(engine);
    return bad;
}
