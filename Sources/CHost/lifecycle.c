#define _GNU_SOURCE
#include "lifecycle.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void stop_set(sigset_t *set) {
    sigemptyset(set);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGHUP);
}

int host_lifecycle_block_stop_signals(void) {
    sigset_t set;
    stop_set(&set);
    return -pthread_sigmask(SIG_BLOCK, &set, NULL);
}

int host_lifecycle_wait_stop_signal(int timeout_ms) {
    sigset_t set;
    stop_set(&set);
    for (;;) {
        int sig;
        if (timeout_ms < 0) {
            sig = sigwaitinfo(&set, NULL);
        } else {
            struct timespec t = { .tv_sec = timeout_ms / 1000, .tv_nsec = (long)(timeout_ms % 1000) * 1000000L };
            sig = sigtimedwait(&set, NULL, &t);
        }
        if (sig > 0) return sig;
        if (errno == EINTR) continue;
        return errno == EAGAIN ? 0 : -errno;
    }
}

int host_lifecycle_prepare_spawn(void *attributes) {
    posix_spawnattr_t *attr = attributes;
    sigset_t none, defaults;
    sigemptyset(&none);
    stop_set(&defaults);
    sigaddset(&defaults, SIGPIPE);
    int rc = posix_spawnattr_setsigmask(attr, &none);
    if (rc == 0) rc = posix_spawnattr_setsigdefault(attr, &defaults);
    if (rc == 0) rc = posix_spawnattr_setflags(attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    return -rc;
}

/* The cleanup list: one immutable block (count, then packed paths), replaced whole. Old
 * blocks are never freed: a fault handler on another thread may be reading one. */
struct cleanup_list {
    int count;
    char paths[];
};
static _Atomic(struct cleanup_list *) cleanup_paths;

int host_lifecycle_set_cleanup_paths(const char *packed, size_t length, int count) {
    struct cleanup_list *list = malloc(sizeof *list + length + 1);
    if (!list) return -ENOMEM;
    list->count = count;
    memcpy(list->paths, packed, length);
    list->paths[length] = 0;
    atomic_store(&cleanup_paths, list);
    return 0;
}

void host_lifecycle_remove_cleanup_paths(void) {
    struct cleanup_list *list = atomic_load(&cleanup_paths);
    if (!list) return;
    const char *p = list->paths;
    for (int i = 0; i < list->count; i++) {
        unlink(p);
        p += strlen(p) + 1;
    }
}

static void write_all(const char *s, size_t n) {
    while (n > 0) {
        ssize_t w = write(2, s, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        s += w;
        n -= (size_t)w;
    }
}

void host_lifecycle_exit_now(const char *message, size_t length, int status) {
    host_lifecycle_remove_cleanup_paths();
    write_all(message, length);
    _exit(status);
}

static atomic_int console_line_open;

void host_lifecycle_note_console_byte(unsigned char byte) {
    atomic_store_explicit(&console_line_open, byte != '\n', memory_order_relaxed);
}

int host_lifecycle_needs_newline(void) {
    if (!atomic_load_explicit(&console_line_open, memory_order_relaxed)) return 0;
    struct stat out, err;
    if (fstat(1, &out) != 0 || fstat(2, &err) != 0) return 1;
    return out.st_dev == err.st_dev && out.st_ino == err.st_ino;
}

static const char *fatal_name(int sig) {
    switch (sig) {
    case SIGSEGV: return "SIGSEGV (invalid memory access)";
    case SIGBUS: return "SIGBUS (bad memory access)";
    case SIGILL: return "SIGILL (a Swift runtime trap or an illegal instruction)";
    case SIGFPE: return "SIGFPE (arithmetic fault)";
    case SIGABRT: return "SIGABRT (abort)";
    default: return "a fatal signal";
    }
}

static void append(char *buf, size_t cap, size_t *len, const char *s) {
    while (*s && *len + 1 < cap) buf[(*len)++] = *s++;
}

static void fatal_handler(int sig, siginfo_t *info, void *context) {
    (void)info; (void)context;
    char thread[17] = {0};
    prctl(PR_GET_NAME, thread, 0, 0, 0);
    char line[256];
    size_t n = 0;
    if (host_lifecycle_needs_newline()) append(line, sizeof line, &n, "\n");
    append(line, sizeof line, &n, "swiftvisor: fatal ");
    append(line, sizeof line, &n, fatal_name(sig));
    append(line, sizeof line, &n, " in thread '");
    append(line, sizeof line, &n, thread);
    append(line, sizeof line, &n, "'; the VM is stopped and swiftvisor exits\n");
    host_lifecycle_exit_now(line, n, 128 + sig);
}

int host_lifecycle_install_fatal_handlers(void) {
    static const int fatal[] = { SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT };
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = fatal_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigfillset(&sa.sa_mask);  // one fault handled at a time; a second fault on another thread waits
    for (size_t i = 0; i < sizeof fatal / sizeof fatal[0]; i++) {
        if (sigaction(fatal[i], &sa, NULL) != 0) return -errno;
    }
    return 0;
}
