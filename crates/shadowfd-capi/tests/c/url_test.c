/* shadowfd_open_url against a real S3 gateway: argv = URL FILE MODE
 * MISSING_URL. The object's bytes through a mapping equal FILE's; a bad
 * URL, a missing key and a NULL url fail with the right errno and a message
 * naming the fix. The AWS variables come from the environment. */
#define _GNU_SOURCE
#include "check.h"

#include <errno.h>

int main(int argc, char **argv) {
    CHECK(argc == 5);
    const char *url = argv[1], *mode = argv[3], *missing = argv[4];
    setup(argv[2]);
    CHECK(want_len % page == 0);
    struct shadowfd_config *c = shadowfd_config_new();
    CHECK(c);
    CHECK_OK(shadowfd_config_set(c, "mode", mode));
    CHECK_OK(shadowfd_config_set(c, "max-size", "64M"));
    struct shadowfd_engine *e = shadowfd_engine_new(c);
    CHECK(e);
    shadowfd_config_free(c);

    struct shadowfd_shadow *s = shadowfd_open_url(e, url);
    if (!s)
        FAIL("shadowfd_open_url(%s)", url);
    CHECK(shadowfd_shadow_size(s) == want_len);
    void *addr = NULL;
    CHECK_OK(shadowfd_map(s, 0, want_len, 0, NULL, &addr));
    if (memcmp(addr, want, want_len) != 0)
        FAIL("the mapping of %s differs from the uploaded bytes", url);
    CHECK_OK(shadowfd_unmap(addr, want_len));
    shadowfd_shadow_free(s);
    printf("ok: %s mapped byte-exact (%s)\n", url, mode);

    CHECK_NULL(shadowfd_open_url(e, "http://not-s3/x"), EINVAL, "s3://BUCKET/KEY");
    CHECK_NULL(shadowfd_open_url(e, missing), ENOENT, "no object");
    CHECK(shadowfd_open_url(e, NULL) == NULL);
    check_message("NULL url", "url is NULL");
    shadowfd_engine_free(e);
    return 0;
}
