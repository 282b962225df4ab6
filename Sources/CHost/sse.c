// The host CPU runs the guest's SSE/SSE2 and x87 arithmetic (see host_sse.h). Every
// instruction is inline assembly, so the compiler cannot substitute, fold or reorder it
// around the MXCSR / control-word switches.
#include "host_sse.h"

#include <string.h>

typedef long long v2di __attribute__((vector_size(16)));

#define P_NONE 0x000
#define P_66 0x100
#define P_F3 0x200
#define P_F2 0x300
#define W 0x400

/* Two-operand instruction: dst op= src. */
#define BIN(c, insn) case c: __asm__ volatile(insn " %1, %0" : "+x"(d) : "x"(s)); break;
/* Same, under the guest's MXCSR. */
#define FBIN(c, insn) case c: fp = 1; __asm__ volatile(insn " %1, %0" : "+x"(d) : "x"(s)); break;

static inline uint32_t enter_mxcsr(uint32_t guest) {
    uint32_t host, g = (guest & 0xFFC0u) | 0x1F80u;
    __asm__ volatile("stmxcsr %0" : "=m"(host));
    __asm__ volatile("ldmxcsr %0" : : "m"(g));
    return host;
}

static inline uint32_t leave_mxcsr(uint32_t host) {
    uint32_t g;
    __asm__ volatile("stmxcsr %0" : "=m"(g));
    __asm__ volatile("ldmxcsr %0" : : "m"(host));
    return g & 0x3Fu;
}

#define CMP8(insn) \
    switch (imm & 7) { \
    case 0: __asm__ volatile(insn " $0, %1, %0" : "+x"(d) : "x"(s)); break; \
    case 1: __asm__ volatile(insn " $1, %1, %0" : "+x"(d) : "x"(s)); break; \
    case 2: __asm__ volatile(insn " $2, %1, %0" : "+x"(d) : "x"(s)); break; \
    case 3: __asm__ volatile(insn " $3, %1, %0" : "+x"(d) : "x"(s)); break; \
    case 4: __asm__ volatile(insn " $4, %1, %0" : "+x"(d) : "x"(s)); break; \
    case 5: __asm__ volatile(insn " $5, %1, %0" : "+x"(d) : "x"(s)); break; \
    case 6: __asm__ volatile(insn " $6, %1, %0" : "+x"(d) : "x"(s)); break; \
    default: __asm__ volatile(insn " $7, %1, %0" : "+x"(d) : "x"(s)); break; \
    }

static int shuffle(uint32_t code, uint32_t imm, v2di *dp, v2di s) {
    uint32_t dw[4], sw[4], r[4];
    uint16_t sh[8], rh[8];
    memcpy(dw, dp, 16);
    memcpy(sw, &s, 16);
    switch (code) {
    case P_66 | 0x70:  // PSHUFD
        for (int i = 0; i < 4; i++) r[i] = sw[(imm >> (2 * i)) & 3];
        memcpy(dp, r, 16);
        return 0;
    case P_F3 | 0x70:  // PSHUFHW
    case P_F2 | 0x70:  // PSHUFLW
        memcpy(sh, &s, 16);
        memcpy(rh, sh, 16);
        for (int i = 0; i < 4; i++) {
            if (code == (P_F3 | 0x70)) rh[4 + i] = sh[4 + ((imm >> (2 * i)) & 3)];
            else rh[i] = sh[(imm >> (2 * i)) & 3];
        }
        memcpy(dp, rh, 16);
        return 0;
    case P_NONE | 0xC6:  // SHUFPS
        r[0] = dw[imm & 3]; r[1] = dw[(imm >> 2) & 3];
        r[2] = sw[(imm >> 4) & 3]; r[3] = sw[(imm >> 6) & 3];
        memcpy(dp, r, 16);
        return 0;
    case P_66 | 0xC6: {  // SHUFPD
        uint64_t dq[2], sq[2], rq[2];
        memcpy(dq, dp, 16); memcpy(sq, &s, 16);
        rq[0] = dq[imm & 1]; rq[1] = sq[(imm >> 1) & 1];
        memcpy(dp, rq, 16);
        return 0;
    }
    case P_66 | 0xC4: {  // PINSRW
        uint16_t v;
        memcpy(sh, dp, 16);
        memcpy(&v, &s, 2);
        sh[imm & 7] = v;
        memcpy(dp, sh, 16);
        return 0;
    }
    }
    return -1;
}

/* PSRLDQ / PSLLDQ by `n` bytes. */
static void byte_shift(v2di *dp, uint32_t n, int left) {
    uint8_t b[16], r[16];
    memcpy(b, dp, 16);
    memset(r, 0, 16);
    if (n > 15) n = 16;
    for (uint32_t i = 0; i + n < 16; i++) {
        if (left) r[i + n] = b[i]; else r[i] = b[i + n];
    }
    memcpy(dp, r, 16);
}

int host_sse_execute(uint32_t code, uint32_t imm, void *dst, const void *src, uint32_t mxcsr,
                     uint32_t *raised, uint64_t *gpr) {
    v2di d, s;
    memcpy(&d, dst, 16);
    memcpy(&s, src, 16);
    int fp = 0;
    uint32_t host = 0;
    // Floating-point instructions run under the guest's MXCSR; set it before any of them.
    switch (code & 0x3FF) {
    case P_NONE | 0x2E: case P_NONE | 0x2F: case P_66 | 0x2E: case P_66 | 0x2F:
    case P_F3 | 0x2A: case P_F2 | 0x2A: case P_F3 | 0x2C: case P_F2 | 0x2C: case P_F3 | 0x2D: case P_F2 | 0x2D:
    case P_NONE | 0xC2: case P_66 | 0xC2: case P_F3 | 0xC2: case P_F2 | 0xC2:
    case P_66 | 0xE6: case P_F3 | 0xE6: case P_F2 | 0xE6:
        fp = 1;
        break;
    default:
        if ((code & 0xFF) >= 0x51 && (code & 0xFF) <= 0x5F && ((code & 0xFF) < 0x54 || (code & 0xFF) > 0x57)) fp = 1;
    }
    if (fp) host = enter_mxcsr(mxcsr);
    int ok = 0;
    switch (code) {
    // Moves between registers that merge.
    BIN(P_F3 | 0x10, "movss")
    BIN(P_F2 | 0x10, "movsd")
    BIN(P_NONE | 0x12, "movhlps")
    BIN(P_NONE | 0x16, "movlhps")
    BIN(P_F3 | 0x7E, "movq")
    // Packed single / double.
    BIN(P_NONE | 0x14, "unpcklps") BIN(P_NONE | 0x15, "unpckhps")
    BIN(P_66 | 0x14, "unpcklpd") BIN(P_66 | 0x15, "unpckhpd")
    BIN(P_NONE | 0x54, "andps") BIN(P_NONE | 0x55, "andnps") BIN(P_NONE | 0x56, "orps") BIN(P_NONE | 0x57, "xorps")
    BIN(P_66 | 0x54, "andpd") BIN(P_66 | 0x55, "andnpd") BIN(P_66 | 0x56, "orpd") BIN(P_66 | 0x57, "xorpd")
    FBIN(P_NONE | 0x51, "sqrtps") FBIN(P_NONE | 0x52, "rsqrtps") FBIN(P_NONE | 0x53, "rcpps")
    FBIN(P_NONE | 0x58, "addps") FBIN(P_NONE | 0x59, "mulps") FBIN(P_NONE | 0x5A, "cvtps2pd") FBIN(P_NONE | 0x5B, "cvtdq2ps")
    FBIN(P_NONE | 0x5C, "subps") FBIN(P_NONE | 0x5D, "minps") FBIN(P_NONE | 0x5E, "divps") FBIN(P_NONE | 0x5F, "maxps")
    FBIN(P_66 | 0x51, "sqrtpd") FBIN(P_66 | 0x58, "addpd") FBIN(P_66 | 0x59, "mulpd") FBIN(P_66 | 0x5A, "cvtpd2ps")
    FBIN(P_66 | 0x5B, "cvtps2dq") FBIN(P_66 | 0x5C, "subpd") FBIN(P_66 | 0x5D, "minpd") FBIN(P_66 | 0x5E, "divpd")
    FBIN(P_66 | 0x5F, "maxpd")
    FBIN(P_F3 | 0x51, "sqrtss") FBIN(P_F3 | 0x52, "rsqrtss") FBIN(P_F3 | 0x53, "rcpss")
    FBIN(P_F3 | 0x58, "addss") FBIN(P_F3 | 0x59, "mulss") FBIN(P_F3 | 0x5A, "cvtss2sd") FBIN(P_F3 | 0x5B, "cvttps2dq")
    FBIN(P_F3 | 0x5C, "subss") FBIN(P_F3 | 0x5D, "minss") FBIN(P_F3 | 0x5E, "divss") FBIN(P_F3 | 0x5F, "maxss")
    FBIN(P_F2 | 0x51, "sqrtsd") FBIN(P_F2 | 0x58, "addsd") FBIN(P_F2 | 0x59, "mulsd") FBIN(P_F2 | 0x5A, "cvtsd2ss")
    FBIN(P_F2 | 0x5C, "subsd") FBIN(P_F2 | 0x5D, "minsd") FBIN(P_F2 | 0x5E, "divsd") FBIN(P_F2 | 0x5F, "maxsd")
    FBIN(P_66 | 0xE6, "cvttpd2dq") FBIN(P_F3 | 0xE6, "cvtdq2pd") FBIN(P_F2 | 0xE6, "cvtpd2dq")
    // Packed integers.
    BIN(P_66 | 0x60, "punpcklbw") BIN(P_66 | 0x61, "punpcklwd") BIN(P_66 | 0x62, "punpckldq") BIN(P_66 | 0x63, "packsswb")
    BIN(P_66 | 0x64, "pcmpgtb") BIN(P_66 | 0x65, "pcmpgtw") BIN(P_66 | 0x66, "pcmpgtd") BIN(P_66 | 0x67, "packuswb")
    BIN(P_66 | 0x68, "punpckhbw") BIN(P_66 | 0x69, "punpckhwd") BIN(P_66 | 0x6A, "punpckhdq") BIN(P_66 | 0x6B, "packssdw")
    BIN(P_66 | 0x6C, "punpcklqdq") BIN(P_66 | 0x6D, "punpckhqdq")
    BIN(P_66 | 0x74, "pcmpeqb") BIN(P_66 | 0x75, "pcmpeqw") BIN(P_66 | 0x76, "pcmpeqd")
    BIN(P_66 | 0xD1, "psrlw") BIN(P_66 | 0xD2, "psrld") BIN(P_66 | 0xD3, "psrlq") BIN(P_66 | 0xD4, "paddq")
    BIN(P_66 | 0xD5, "pmullw") BIN(P_66 | 0xD8, "psubusb") BIN(P_66 | 0xD9, "psubusw") BIN(P_66 | 0xDA, "pminub")
    BIN(P_66 | 0xDB, "pand") BIN(P_66 | 0xDC, "paddusb") BIN(P_66 | 0xDD, "paddusw") BIN(P_66 | 0xDE, "pmaxub")
    BIN(P_66 | 0xDF, "pandn")
    BIN(P_66 | 0xE0, "pavgb") BIN(P_66 | 0xE1, "psraw") BIN(P_66 | 0xE2, "psrad") BIN(P_66 | 0xE3, "pavgw")
    BIN(P_66 | 0xE4, "pmulhuw") BIN(P_66 | 0xE5, "pmulhw") BIN(P_66 | 0xE8, "psubsb") BIN(P_66 | 0xE9, "psubsw")
    BIN(P_66 | 0xEA, "pminsw") BIN(P_66 | 0xEB, "por") BIN(P_66 | 0xEC, "paddsb") BIN(P_66 | 0xED, "paddsw")
    BIN(P_66 | 0xEE, "pmaxsw") BIN(P_66 | 0xEF, "pxor")
    BIN(P_66 | 0xF1, "psllw") BIN(P_66 | 0xF2, "pslld") BIN(P_66 | 0xF3, "psllq") BIN(P_66 | 0xF4, "pmuludq")
    BIN(P_66 | 0xF5, "pmaddwd") BIN(P_66 | 0xF6, "psadbw") BIN(P_66 | 0xF8, "psubb") BIN(P_66 | 0xF9, "psubw")
    BIN(P_66 | 0xFA, "psubd") BIN(P_66 | 0xFB, "psubq") BIN(P_66 | 0xFC, "paddb") BIN(P_66 | 0xFD, "paddw")
    BIN(P_66 | 0xFE, "paddd")
    // Comparisons with a predicate.
    case P_NONE | 0xC2: CMP8("cmpps") break;
    case P_66 | 0xC2: CMP8("cmppd") break;
    case P_F3 | 0xC2: CMP8("cmpss") break;
    case P_F2 | 0xC2: CMP8("cmpsd") break;
    // Shifts by an immediate: the count-register forms with the immediate as the count.
    case P_66 | 0x71: case P_66 | 0x72: case P_66 | 0x73: {
        v2di count = {(long long)(imm & 0xFF), 0};
        uint32_t ext = imm >> 8, op = code & 0xFF;
        if (op == 0x71 && ext == 2) __asm__ volatile("psrlw %1, %0" : "+x"(d) : "x"(count));
        else if (op == 0x71 && ext == 4) __asm__ volatile("psraw %1, %0" : "+x"(d) : "x"(count));
        else if (op == 0x71 && ext == 6) __asm__ volatile("psllw %1, %0" : "+x"(d) : "x"(count));
        else if (op == 0x72 && ext == 2) __asm__ volatile("psrld %1, %0" : "+x"(d) : "x"(count));
        else if (op == 0x72 && ext == 4) __asm__ volatile("psrad %1, %0" : "+x"(d) : "x"(count));
        else if (op == 0x72 && ext == 6) __asm__ volatile("pslld %1, %0" : "+x"(d) : "x"(count));
        else if (op == 0x73 && ext == 2) __asm__ volatile("psrlq %1, %0" : "+x"(d) : "x"(count));
        else if (op == 0x73 && ext == 6) __asm__ volatile("psllq %1, %0" : "+x"(d) : "x"(count));
        else if (op == 0x73 && (ext == 3 || ext == 7)) byte_shift(&d, imm & 0xFF, ext == 7);
        else ok = -1;
        break;
    }
    // General-purpose results.
    case P_NONE | 0x50: { uint32_t m; __asm__ volatile("movmskps %1, %0" : "=r"(m) : "x"(s)); *gpr = m; break; }
    case P_66 | 0x50: { uint32_t m; __asm__ volatile("movmskpd %1, %0" : "=r"(m) : "x"(s)); *gpr = m; break; }
    case P_66 | 0xD7: { uint32_t m; __asm__ volatile("pmovmskb %1, %0" : "=r"(m) : "x"(s)); *gpr = m; break; }
    case P_66 | 0xC5: { uint16_t h[8]; memcpy(h, &s, 16); *gpr = h[imm & 7]; break; }
    case P_F3 | 0x2C: { uint32_t v; __asm__ volatile("cvttss2si %1, %0" : "=r"(v) : "x"(s)); *gpr = v; break; }
    case P_F3 | 0x2D: { uint32_t v; __asm__ volatile("cvtss2si %1, %0" : "=r"(v) : "x"(s)); *gpr = v; break; }
    case P_F2 | 0x2C: { uint32_t v; __asm__ volatile("cvttsd2si %1, %0" : "=r"(v) : "x"(s)); *gpr = v; break; }
    case P_F2 | 0x2D: { uint32_t v; __asm__ volatile("cvtsd2si %1, %0" : "=r"(v) : "x"(s)); *gpr = v; break; }
    case W | P_F3 | 0x2C: { uint64_t v; __asm__ volatile("cvttss2si %1, %0" : "=r"(v) : "x"(s)); *gpr = v; break; }
    case W | P_F3 | 0x2D: { uint64_t v; __asm__ volatile("cvtss2si %1, %0" : "=r"(v) : "x"(s)); *gpr = v; break; }
    case W | P_F2 | 0x2C: { uint64_t v; __asm__ volatile("cvttsd2si %1, %0" : "=r"(v) : "x"(s)); *gpr = v; break; }
    case W | P_F2 | 0x2D: { uint64_t v; __asm__ volatile("cvtsd2si %1, %0" : "=r"(v) : "x"(s)); *gpr = v; break; }
    case P_F3 | 0x2A: { uint32_t v; memcpy(&v, &s, 4); __asm__ volatile("cvtsi2ssl %1, %0" : "+x"(d) : "r"(v)); break; }
    case P_F2 | 0x2A: { uint32_t v; memcpy(&v, &s, 4); __asm__ volatile("cvtsi2sdl %1, %0" : "+x"(d) : "r"(v)); break; }
    case W | P_F3 | 0x2A: { uint64_t v; memcpy(&v, &s, 8); __asm__ volatile("cvtsi2ssq %1, %0" : "+x"(d) : "r"(v)); break; }
    case W | P_F2 | 0x2A: { uint64_t v; memcpy(&v, &s, 8); __asm__ volatile("cvtsi2sdq %1, %0" : "+x"(d) : "r"(v)); break; }
    case P_NONE | 0x2E: case P_NONE | 0x2F: case P_66 | 0x2E: case P_66 | 0x2F: {
        uint8_t z, p, c;
        switch (code) {
        case P_NONE | 0x2E: __asm__ volatile("ucomiss %3, %4; setz %0; setp %1; setc %2" : "=r"(z), "=r"(p), "=r"(c) : "x"(s), "x"(d) : "cc"); break;
        case P_NONE | 0x2F: __asm__ volatile("comiss %3, %4; setz %0; setp %1; setc %2" : "=r"(z), "=r"(p), "=r"(c) : "x"(s), "x"(d) : "cc"); break;
        case P_66 | 0x2E: __asm__ volatile("ucomisd %3, %4; setz %0; setp %1; setc %2" : "=r"(z), "=r"(p), "=r"(c) : "x"(s), "x"(d) : "cc"); break;
        default: __asm__ volatile("comisd %3, %4; setz %0; setp %1; setc %2" : "=r"(z), "=r"(p), "=r"(c) : "x"(s), "x"(d) : "cc"); break;
        }
        *gpr = (uint64_t)(z ? 0x40 : 0) | (p ? 0x4 : 0) | (c ? 0x1 : 0);
        break;
    }
    default:
        ok = shuffle(code & 0x3FF, imm & 0xFF, &d, s);
    }
    *raised = fp ? leave_mxcsr(host) : 0;
    if (ok == 0) memcpy(dst, &d, 16);
    return ok;
}

// MARK: x87

static inline uint16_t enter_fcw(uint16_t guest) {
    uint16_t host, g = (uint16_t)(guest | 0x3F);  // all exceptions masked
    __asm__ volatile("fnstcw %0" : "=m"(host));
    __asm__ volatile("fnclex; fldcw %0" : : "m"(g));
    return host;
}

static inline uint16_t leave_fcw(uint16_t host) {
    uint16_t sw;
    __asm__ volatile("fnstsw %0" : "=m"(sw));
    __asm__ volatile("fnclex; fldcw %0" : : "m"(host));
    return sw;
}

void host_x87_execute(uint32_t op, const void *a, const void *b, void *result, void *result2, uint16_t fcw, uint16_t *status) {
    long double x, y, r = 0, r2 = 0;
    memcpy(&x, a, 10);
    memcpy(&y, b, 10);
    uint16_t host = enter_fcw(fcw);
    uint16_t flags = 0;
    switch (op) {
    case 0: __asm__ volatile("faddp" : "=t"(r) : "0"(x), "u"(y) : "st(1)"); break;
    case 1: __asm__ volatile("fmulp" : "=t"(r) : "0"(x), "u"(y) : "st(1)"); break;
    case 2: __asm__ volatile("fcomp %%st(1)" : : "t"(x), "u"(y) : "st"); r = x; break;
    case 3: __asm__ volatile("fucomp %%st(1)" : : "t"(x), "u"(y) : "st"); r = x; break;
    // GAS's fsubp/fdivp with these operands compute st(0) op st(1), then pop.
    case 4: __asm__ volatile("fsubp %%st, %%st(1)" : "=t"(r) : "0"(x), "u"(y) : "st(1)"); break;  // x - y
    case 5: __asm__ volatile("fsubp %%st, %%st(1)" : "=t"(r) : "0"(y), "u"(x) : "st(1)"); break;  // y - x
    case 6: __asm__ volatile("fdivp %%st, %%st(1)" : "=t"(r) : "0"(x), "u"(y) : "st(1)"); break;  // x / y
    case 7: __asm__ volatile("fdivp %%st, %%st(1)" : "=t"(r) : "0"(y), "u"(x) : "st(1)"); break;  // y / x
    case 8: __asm__ volatile("fsqrt" : "=t"(r) : "0"(x)); break;
    case 9: __asm__ volatile("frndint" : "=t"(r) : "0"(x)); break;
    case 10: case 11: {
        uint8_t z, p, c;
        if (op == 10) __asm__ volatile("fcomi %%st(1), %%st; setz %0; setp %1; setc %2" : "=r"(z), "=r"(p), "=r"(c) : "t"(x), "u"(y) : "cc");
        else __asm__ volatile("fucomi %%st(1), %%st; setz %0; setp %1; setc %2" : "=r"(z), "=r"(p), "=r"(c) : "t"(x), "u"(y) : "cc");
        flags = (uint16_t)((z ? 0x40 : 0) | (p ? 0x4 : 0) | (c ? 0x1 : 0));
        r = x;
        break;
    }
    case 12: __asm__ volatile("f2xm1" : "=t"(r) : "0"(x)); break;
    case 13: __asm__ volatile("fsin" : "=t"(r) : "0"(x)); break;
    case 14: __asm__ volatile("fcos" : "=t"(r) : "0"(x)); break;
    // x = st(0), y = st(1); the result replaces st(1).
    case 15: __asm__ volatile("fyl2x" : "=t"(r) : "0"(x), "u"(y) : "st(1)"); break;
    case 16: __asm__ volatile("fpatan" : "=t"(r) : "0"(x), "u"(y) : "st(1)"); break;
    case 17: __asm__ volatile("fyl2xp1" : "=t"(r) : "0"(x), "u"(y) : "st(1)"); break;
    // These keep st(1): the result replaces st(0).
    case 18: __asm__ volatile("fprem" : "=t"(r) : "0"(x), "u"(y)); break;
    case 19: __asm__ volatile("fprem1" : "=t"(r) : "0"(x), "u"(y)); break;
    case 20: __asm__ volatile("fscale" : "=t"(r) : "0"(x), "u"(y)); break;
    case 21: __asm__ volatile("fld1" : "=t"(r)); break;
    case 22: __asm__ volatile("fldl2t" : "=t"(r)); break;
    case 23: __asm__ volatile("fldl2e" : "=t"(r)); break;
    case 24: __asm__ volatile("fldpi" : "=t"(r)); break;
    case 25: __asm__ volatile("fldlg2" : "=t"(r)); break;
    case 26: __asm__ volatile("fldln2" : "=t"(r)); break;
    case 27: __asm__ volatile("fldz" : "=t"(r)); break;
    // Two results: r replaces st(0), r2 is pushed.
    case 28: __asm__ volatile("fptan" : "=t"(r2), "=u"(r) : "0"(x)); break;
    case 29: __asm__ volatile("fsincos" : "=t"(r2), "=u"(r) : "0"(x)); break;
    case 30: __asm__ volatile("fxtract" : "=t"(r2), "=u"(r) : "0"(x)); break;
    }
    uint16_t sw = leave_fcw(host);
    memcpy(result, &r, 10);
    if (result2) memcpy(result2, &r2, 10);
    *status = (op == 10 || op == 11) ? (uint16_t)((sw & 0x3F) << 8 | flags) : sw;
}

uint64_t host_x87_to_integer(const void *value, int size, int truncate, uint16_t fcw, uint16_t *status) {
    long double x;
    memcpy(&x, value, 10);
    uint16_t host = enter_fcw(fcw);
    uint64_t r = 0;
    int16_t r16; int32_t r32; int64_t r64;
    if (truncate) {
        switch (size) {
        case 2: __asm__ volatile("fisttps %0" : "=m"(r16) : "t"(x) : "st"); r = (uint16_t)r16; break;
        case 4: __asm__ volatile("fisttpl %0" : "=m"(r32) : "t"(x) : "st"); r = (uint32_t)r32; break;
        default: __asm__ volatile("fisttpll %0" : "=m"(r64) : "t"(x) : "st"); r = (uint64_t)r64; break;
        }
    } else {
        switch (size) {
        case 2: __asm__ volatile("fistps %0" : "=m"(r16) : "t"(x) : "st"); r = (uint16_t)r16; break;
        case 4: __asm__ volatile("fistpl %0" : "=m"(r32) : "t"(x) : "st"); r = (uint32_t)r32; break;
        default: __asm__ volatile("fistpll %0" : "=m"(r64) : "t"(x) : "st"); r = (uint64_t)r64; break;
        }
    }
    *status = leave_fcw(host);
    return r;
}

uint64_t host_x87_to_float(const void *value, int size, uint16_t fcw, uint16_t *status) {
    long double x;
    memcpy(&x, value, 10);
    uint16_t host = enter_fcw(fcw);
    uint64_t r = 0;
    if (size == 4) {
        uint32_t f;
        __asm__ volatile("fstps %0" : "=m"(f) : "t"(x) : "st");
        r = f;
    } else {
        __asm__ volatile("fstpl %0" : "=m"(r) : "t"(x) : "st");
    }
    *status = leave_fcw(host);
    return r;
}

void host_x87_load(uint64_t bits, int size, int integer, void *result, uint16_t *status) {
    long double r;
    uint16_t host = enter_fcw(0x37F);
    if (integer) {
        int16_t i16 = (int16_t)bits; int32_t i32 = (int32_t)bits; int64_t i64 = (int64_t)bits;
        if (size == 2) __asm__ volatile("filds %1" : "=t"(r) : "m"(i16));
        else if (size == 4) __asm__ volatile("fildl %1" : "=t"(r) : "m"(i32));
        else __asm__ volatile("fildll %1" : "=t"(r) : "m"(i64));
    } else if (size == 4) {
        uint32_t f = (uint32_t)bits;
        __asm__ volatile("flds %1" : "=t"(r) : "m"(f));
    } else {
        __asm__ volatile("fldl %1" : "=t"(r) : "m"(bits));
    }
    *status = leave_fcw(host);
    memcpy(result, &r, 10);
}
