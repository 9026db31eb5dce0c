/* tests/c/tap.h: TAP output for the C tests (run under prove). */
#ifndef NEMO_TAP_H
#define NEMO_TAP_H
#include <stdio.h>
static int tap_n, tap_failed;
#define TAP_OK(cond, ...) do { int ok_ = !!(cond); tap_n++; if (!ok_) tap_failed++;            \
    printf("%s %d - ", ok_ ? "ok" : "not ok", tap_n); printf(__VA_ARGS__); printf("\n"); } while (0)
#define TAP_DONE() (printf("1..%d\n", tap_n), tap_failed ? 1 : 0)
#endif
