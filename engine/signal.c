/* engine/signal.c: signals a long job ends gracefully on (the training recipe's
 * step_scheduler.preemption_signal, SIGTERM by default as in Automodel). The handler only records
 * that the signal came, in a sig_atomic_t flag the Lua loop polls after each step; SA_RESETHAND
 * gives the signal its default action back, so a second one ends the process at once. */
#define _GNU_SOURCE
#include <signal.h>
#include <string.h>

#include "internal.h"

#define NSIG_WATCHED 65

static volatile sig_atomic_t received[NSIG_WATCHED];
static struct sigaction previous[NSIG_WATCHED];
static int watched[NSIG_WATCHED];

static void on_signal(int sig) {
    if (sig > 0 && sig < NSIG_WATCHED) received[sig] = 1;
}

static int check_sig(int sig, const char *who) {
    if (sig <= 0 || sig >= NSIG_WATCHED || sig == SIGKILL || sig == SIGSTOP)
        return NEMO_ERR(NEMO_EINVAL, "%s: %d is not a signal that can be caught", who, sig);
    return 0;
}

NEMO_API int nemo_signal_watch(int sig) {
    if (check_sig(sig, "nemo_signal_watch")) return -1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART | SA_RESETHAND;
    received[sig] = 0;
    if (sigaction(sig, &sa, watched[sig] ? NULL : &previous[sig]) != 0)
        return NEMO_ERR(NEMO_EINVAL, "nemo_signal_watch: sigaction(%d) failed", sig), -1;
    watched[sig] = 1;
    return 0;
}

NEMO_API int nemo_signal_received(int sig) {
    if (sig <= 0 || sig >= NSIG_WATCHED) return 0;
    return received[sig] != 0;
}

NEMO_API int nemo_signal_unwatch(int sig) {
    if (check_sig(sig, "nemo_signal_unwatch")) return -1;
    if (!watched[sig]) return 0;
    sigaction(sig, &previous[sig], NULL);
    watched[sig] = 0;
    received[sig] = 0;
    return 0;
}
