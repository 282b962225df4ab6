// summary: instruction groups on boundary operands (flags, shifts, division, bit ops, strings); prints a digest per group
// test-guest
#include "sv.h"

/* Each probe runs one instruction on given operands at CPL3 and folds the result and the
 * arithmetic flags into a per-group digest. The same guest runs on both engines in the
 * differential tests, so any difference in any group shows up as a different line. */

#define FLAGS_MASK 0x8D5ul  /* OF SF ZF AF PF CF */
#define DEFINED 0x8C5ul     /* OF SF ZF PF CF (AF is undefined after logic ops) */

static const uint64_t operands[] = {
    0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000ul, 0xFFFFFFFFul,
    0x100000000ul, 0x7FFFFFFFFFFFFFFFul, 0x8000000000000000ul, 0xFFFFFFFFFFFFFFFFul, 0x123456789ABCDEF0ul,
};
#define N (sizeof operands / sizeof operands[0])

static uint64_t digest;
static void fold(uint64_t v) { digest = (digest ^ v) * 0x100000001B3ul; }

#define BINARY(name, insn, mask)                                                              \
    static void name(uint64_t a, uint64_t b) {                                                 \
        uint64_t r = a, f;                                                                     \
        __asm__ volatile(insn " %2, %0\n\tpushfq\n\tpopq %1" : "+r"(r), "=r"(f) : "r"(b) : "cc"); \
        fold(r); fold(f & (mask));                                                             \
    }
BINARY(add64, "addq", FLAGS_MASK)
BINARY(sub64, "subq", FLAGS_MASK)
BINARY(and64, "andq", DEFINED)
BINARY(xor64, "xorq", DEFINED)
BINARY(imul64, "imulq", 0x801ul)  /* CF OF */

#define BINARY32(name, insn, mask)                                                             \
    static void name(uint64_t a, uint64_t b) {                                                 \
        uint32_t r = (uint32_t)a; uint64_t f;                                                  \
        __asm__ volatile(insn " %2, %0\n\tpushfq\n\tpopq %1" : "+r"(r), "=r"(f) : "r"((uint32_t)b) : "cc"); \
        fold(r); fold(f & (mask));                                                             \
    }
BINARY32(adc32, "stc\n\tadcl", FLAGS_MASK)
BINARY32(sbb32, "stc\n\tsbbl", FLAGS_MASK)
BINARY32(cmp32, "cmpl", FLAGS_MASK)

static void shifts(uint64_t a, uint64_t b) {
    static const uint8_t counts[] = { 0, 1, 31, 63 };
    for (unsigned i = 0; i < 4; i++) {
        uint64_t r, f;
        uint8_t c = counts[i];
        uint64_t mask = c == 1 ? 0x8C5ul : 0xC5ul;  /* OF only defined for count 1 */
        r = a; __asm__ volatile("shlq %%cl, %0\n\tpushfq\n\tpopq %1" : "+r"(r), "=r"(f) : "c"(c) : "cc"); fold(r); fold(f & mask);
        r = a; __asm__ volatile("shrq %%cl, %0\n\tpushfq\n\tpopq %1" : "+r"(r), "=r"(f) : "c"(c) : "cc"); fold(r); fold(f & mask);
        r = a; __asm__ volatile("sarq %%cl, %0\n\tpushfq\n\tpopq %1" : "+r"(r), "=r"(f) : "c"(c) : "cc"); fold(r); fold(f & mask);
        r = a; __asm__ volatile("rolq %%cl, %0\n\tpushfq\n\tpopq %1" : "+r"(r), "=r"(f) : "c"(c) : "cc"); fold(r); fold(f & (c ? 1 : 0));
        r = a; __asm__ volatile("rorl %%cl, %k0\n\tpushfq\n\tpopq %1" : "+r"(r), "=r"(f) : "c"(c) : "cc"); fold(r); fold(f & (c ? 1 : 0));
    }
    (void)b;
}

static void division(uint64_t a, uint64_t b) {
    if (b == 0) return;
    uint64_t q = a, r = 0;
    __asm__ volatile("xorl %%edx, %%edx\n\tdivq %2" : "+a"(q), "=&d"(r) : "r"(b) : "cc");
    fold(q); fold(r);
    int64_t sa = (int64_t)a, sb = (int64_t)b;
    if (!(sa == (-0x7FFFFFFFFFFFFFFFl - 1) && sb == -1)) {
        int64_t sq = sa, sr;
        __asm__ volatile("cqto\n\tidivq %2" : "+a"(sq), "=&d"(sr) : "r"(sb) : "cc");
        fold((uint64_t)sq); fold((uint64_t)sr);
    }
}

static void bits(uint64_t a, uint64_t b) {
    uint64_t r, f;
    __asm__ volatile("btq %2, %1\n\tpushfq\n\tpopq %0" : "=r"(f) : "r"(a), "r"(b & 63) : "cc"); fold(f & 1);
    r = a; __asm__ volatile("btsq %1, %0" : "+r"(r) : "r"(b & 63) : "cc"); fold(r);
    r = a; __asm__ volatile("btrq %1, %0" : "+r"(r) : "r"(b & 63) : "cc"); fold(r);
    r = a; __asm__ volatile("btcq %1, %0" : "+r"(r) : "r"(b & 63) : "cc"); fold(r);
    r = 0; __asm__ volatile("popcntq %1, %0" : "=r"(r) : "r"(a) : "cc"); fold(r);
    r = 0; __asm__ volatile("lzcntq %1, %0" : "=r"(r) : "r"(a) : "cc"); fold(r);
    r = 0; __asm__ volatile("tzcntq %1, %0" : "=r"(r) : "r"(a) : "cc"); fold(r);
    if (a) { __asm__ volatile("bsfq %1, %0" : "=r"(r) : "r"(a) : "cc"); fold(r); __asm__ volatile("bsrq %1, %0" : "=r"(r) : "r"(a) : "cc"); fold(r); }
    r = a; __asm__ volatile("bswapq %0" : "+r"(r)); fold(r);
    uint64_t x = a, y = b;
    __asm__ volatile("xaddq %0, %1" : "+r"(x), "+r"(y) :: "cc"); fold(x); fold(y);
    uint64_t mem = a, expect = a, repl = b;
    __asm__ volatile("lock cmpxchgq %2, %1" : "+a"(expect), "+m"(mem) : "r"(repl) : "cc"); fold(mem); fold(expect);
}

struct group { const char *name; void (*probe)(uint64_t, uint64_t); };
static const struct group groups[] = {
    { "add", add64 }, { "sub", sub64 }, { "and", and64 }, { "xor", xor64 }, { "imul", imul64 },
    { "adc32", adc32 }, { "sbb32", sbb32 }, { "cmp32", cmp32 },
    { "shift", shifts }, { "div", division }, { "bits", bits },
};

static char buffer_a[64], buffer_b[64];

static void strings(void) {
    for (int i = 0; i < 64; i++) buffer_a[i] = (char)(i * 7), buffer_b[i] = (char)(i * 7);
    buffer_b[37] ^= 1;
    uint64_t left = 64;
    const char *p = buffer_a, *q = buffer_b;
    __asm__ volatile("repe cmpsb" : "+S"(p), "+D"(q), "+c"(left) :: "cc", "memory");
    fold(left); fold((uint64_t)(p - buffer_a));
    left = 64; q = buffer_b;
    __asm__ volatile("repne scasb" : "+D"(q), "+c"(left) : "a"(35 * 7) : "cc", "memory");
    fold(left);
    char *d = buffer_a + 8;
    uint64_t n = 16;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(q), "+c"(n) :: "memory");
    fold(buffer_a[20]);
}

static void run_groups(void *arg) {
    (void)arg;
    for (unsigned g = 0; g < sizeof groups / sizeof groups[0]; g++) {
        digest = 0xCBF29CE484222325ul;
        for (unsigned i = 0; i < N; i++)
            for (unsigned j = 0; j < N; j++) groups[g].probe(operands[i], operands[j]);
        sv_printf("%s: %016lx\n", groups[g].name, digest);
    }
    digest = 0xCBF29CE484222325ul;
    strings();
    sv_printf("strings: %016lx\n", digest);
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    sv_run_user(run_groups, 0);
    sv_puts("coverage: done\n");
    return 0;
}
