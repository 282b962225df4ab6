#ifndef CHOST_LIFECYCLE_H
#define CHOST_LIFECYCLE_H

#include <stddef.h>

/* Process lifecycle (lifecycle.c; used by VMM/ProcessLifecycle.swift).
 *
 * Stop signals (SIGINT, SIGTERM, SIGHUP) are blocked in the calling thread, and so in every
 * thread it creates afterwards; one watcher thread takes them with sigtimedwait. Call
 * `host_lifecycle_block_stop_signals` before any other thread exists. */
int host_lifecycle_block_stop_signals(void);

/// Waits for a stop signal: its number, 0 after `timeout_ms` (< 0: no limit), or -errno.
int host_lifecycle_wait_stop_signal(int timeout_ms);

/// Clears the signal mask and restores default dispositions for a posix_spawn child.
/// `attributes` points at a posix_spawnattr_t already initialised by the caller.
int host_lifecycle_prepare_spawn(void *attributes);

/* Fatal faults (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) on any thread: the handler removes
 * the files last given to `host_lifecycle_set_cleanup_paths`, writes one line to standard
 * error and ends the process with 128 + signal (only async-signal-safe calls). */
int host_lifecycle_install_fatal_handlers(void);

/// The files a fatal fault removes: `count` NUL-terminated paths packed in `packed`
/// (`length` bytes). Copied; safe to call from any thread.
int host_lifecycle_set_cleanup_paths(const char *packed, size_t length, int count);

/// Removes the files given to `host_lifecycle_set_cleanup_paths` (async-signal-safe).
void host_lifecycle_remove_cleanup_paths(void);

/// Writes `length` bytes to standard error, then ends the process at once with `status`
/// (no atexit handlers, no Swift code): the last resort of the stop-signal watcher.
void host_lifecycle_exit_now(const char *message, size_t length, int status) __attribute__((noreturn));

/* The guest console's last byte on standard output, so that a stop message starts on its own
 * line: `needs_newline` is 1 when that byte was not a newline and standard error goes where
 * standard output goes (a terminal, or both redirected to one file). */
void host_lifecycle_note_console_byte(unsigned char byte);
int host_lifecycle_needs_newline(void);

#endif
