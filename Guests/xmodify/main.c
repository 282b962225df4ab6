// summary: self- and cross-modifying code: a function is rewritten after it has run (by CPU 1 with --vcpus 2, else by CPU 0) and must run as rewritten; rounds=N
#include "sv.h"

/* A function on a page of its own, written at run time: mov eax, imm32; ret. */
static uint8_t fn_page[4096] __attribute__((aligned(4096)));
static volatile uint32_t step;
static volatile uint32_t mismatches, first_bad_round, first_bad_value;

/* Plain stores, as a JIT or a loader would patch code (the immediate in one unaligned
 * 32-bit store, so that no byte-register form is involved). */
typedef uint32_t unaligned_u32 __attribute__((aligned(1), may_alias));
static void write_fn(uint32_t imm) {
    fn_page[0] = 0xB8;
    *(volatile unaligned_u32 *)(void *)(fn_page + 1) = imm;
    fn_page[5] = 0xC3;
}

static uint32_t call_fn(void) {
    uint32_t (*fn)(void) = (uint32_t (*)(void))(void *)fn_page;
    return fn();
}

/* What x86 asks of the CPU that runs code another CPU modified: a serializing instruction. */
static inline void serialize(void) {
    uint32_t a = 0, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d) :: "memory");
}

static void wait_step(uint32_t s) { while (__atomic_load_n(&step, __ATOMIC_ACQUIRE) != s) sv_pause(); }
static void set_step(uint32_t s) { __atomic_store_n(&step, s, __ATOMIC_RELEASE); }

static uint32_t value_for(uint32_t round) { return 0x11111111u * (round % 15 + 1) + round; }

struct job { uint32_t rounds; unsigned cpus; };

static void check(uint32_t round, uint32_t got) {
    if (got != value_for(round) && mismatches++ == 0) { first_bad_round = round; first_bad_value = got; }
}

/* CPU 0 runs the function after each rewrite. With one CPU it rewrites it itself. */
static void runner(void *arg) {
    struct job *j = arg;
    for (uint32_t r = 0; r < j->rounds; r++) {
        if (j->cpus == 1) {
            write_fn(value_for(r));
        } else {
            wait_step(2 * r + 1);  /* CPU 1 has written round r */
            serialize();
        }
        check(r, call_fn());
        check(r, call_fn());       /* the second call runs the code translated by the first */
        if (j->cpus > 1) set_step(2 * r + 2);
    }
}

/* CPU 1 rewrites the function; its first write happens before CPU 0 ever ran it, so any
 * write permission it cached for the page predates the page becoming code. */
static void writer(void *arg) {
    struct job *j = arg;
    for (uint32_t r = 0; r < j->rounds; r++) {
        write_fn(value_for(r));
        set_step(2 * r + 1);
        wait_step(2 * r + 2);
    }
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    struct job j = { (uint32_t)sv_cmdline_u64("rounds", 100), bi->vcpu_count >= 2 ? 2 : 1 };
    if (cpu == 1) { sv_run_user(writer, &j); return 0; }
    if (cpu != 0) return 0;
    sv_run_user(runner, &j);
    if (mismatches) {
        sv_printf("xmodify: %u stale calls; first in round %u returned %08x, expected %08x\n",
                  mismatches, first_bad_round, first_bad_value, value_for(first_bad_round));
        return 1;
    }
    sv_printf("xmodify: %u rewrites by cpu %u, each run as rewritten by cpu 0\n", j.rounds, j.cpus == 1 ? 0 : 1);
    return 0;
}
