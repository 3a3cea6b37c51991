/* Checks shared by the C test programs: on failure, say where, what, and
 * shadowfd_last_error(), then exit 2. CHECK_ERR needs a
 * check_message(const char *call, const char *word) of the including file. */
#ifndef SHADOWFD_TEST_CHECK_H
#define SHADOWFD_TEST_CHECK_H

#include <shadowfd.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

#endif
