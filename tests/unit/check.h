/* tests/unit/check.h — the smallest test harness that says what failed.
 * Each test file has a main() that calls RUN(test_fn) and returns
 * check_summary(), which prints "N passed, N failed" and the exit status. */
#ifndef TESTS_UNIT_CHECK_H
#define TESTS_UNIT_CHECK_H

#include <stdio.h>
#include <string.h>

static int check_failures_in_test;
static int check_passed, check_failed;

#define CHECK(cond) do { \
    if (!(cond)) { \
        fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        check_failures_in_test++; \
    } } while (0)

#define CHECK_EQ_INT(a, b) do { \
    long long check_a_ = (long long)(a), check_b_ = (long long)(b); \
    if (check_a_ != check_b_) { \
        fprintf(stderr, "%s:%d: CHECK failed: %s == %s (%lld != %lld)\n", \
                __FILE__, __LINE__, #a, #b, check_a_, check_b_); \
        check_failures_in_test++; \
    } } while (0)

#define CHECK_EQ_STR(a, b) do { \
    const char *check_a_ = (a), *check_b_ = (b); \
    if (!check_a_ || !check_b_ || strcmp(check_a_, check_b_) != 0) { \
        fprintf(stderr, "%s:%d: CHECK failed: %s == %s (\"%s\" != \"%s\")\n", \
                __FILE__, __LINE__, #a, #b, check_a_ ? check_a_ : "(null)", \
                check_b_ ? check_b_ : "(null)"); \
        check_failures_in_test++; \
    } } while (0)

#define RUN(fn) do { \
    check_failures_in_test = 0; \
    fn(); \
    if (check_failures_in_test) { check_failed++; fprintf(stderr, "FAIL %s\n", #fn); } \
    else { check_passed++; fprintf(stderr, "ok   %s\n", #fn); } \
    } while (0)

static inline int check_summary(void)
{
    printf("%d passed, %d failed\n", check_passed, check_failed);
    return check_failed ? 1 : 0;
}

#endif
