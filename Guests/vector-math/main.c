// summary: double-precision, SSE2-vector and x87 arithmetic at CPL3, printed as bit patterns; scale=N
// uses-sse
#include "sv.h"
#include <emmintrin.h>

// Built with SSE2 (GuestBuilder drops -mgeneral-regs-only for `uses-sse` guests): the
// compiler uses XMM registers for every double here, and the vector loops below use SSE2
// intrinsics the way a libc's memcpy/strlen do. Results print as hex so both engines'
// outputs compare byte for byte.

#define N 4096

static double xs[N], ys[N];
static uint8_t text[N + 64], copy[N + 64];

static uint64_t bits(double d) { uint64_t b; memcpy(&b, &d, 8); return b; }

/// Newton's square root, a harmonic sum and a Leibniz series: scalar double arithmetic.
static uint64_t scalar(unsigned scale) {
    double acc = 0;
    for (unsigned r = 0; r < scale; r++) {
        for (unsigned i = 1; i <= N; i++) {
            double x = (double)i * 1.25, g = x / 2;
            for (int k = 0; k < 6; k++) g = 0.5 * (g + x / g);
            acc += g / (double)(i + r);
        }
        double pi = 0;
        for (int k = 0; k < 20000; k++) pi += (k & 1 ? -4.0 : 4.0) / (2 * k + 1);
        acc += pi;
    }
    return bits(acc);
}

/// A dot product and an AXPY with packed doubles, then conversions to integers.
static uint64_t packed(unsigned scale) {
    for (unsigned i = 0; i < N; i++) { xs[i] = (double)i / 7.0 - 100.0; ys[i] = 1.0 / (double)(i + 1); }
    __m128d sum = _mm_setzero_pd();
    for (unsigned r = 0; r < scale; r++) {
        for (unsigned i = 0; i < N; i += 2) {
            __m128d a = _mm_load_pd(&xs[i]), b = _mm_load_pd(&ys[i]);
            sum = _mm_add_pd(sum, _mm_mul_pd(a, b));
            _mm_store_pd(&ys[i], _mm_add_pd(_mm_mul_pd(_mm_set1_pd(0.5), a), b));
        }
    }
    __m128d total = _mm_add_sd(sum, _mm_unpackhi_pd(sum, sum));
    int64_t rounded = _mm_cvtsd_si64(_mm_mul_sd(total, _mm_set_sd(1024.0)));
    return bits(_mm_cvtsd_f64(total)) ^ (uint64_t)rounded;
}

/// strlen and memchr the SSE2 way (PCMPEQB + PMOVMSKB), a MOVDQU copy, byte sums (PSADBW).
static uint64_t bytes(void) {
    uint64_t seed = 0x9E3779B97F4A7C15ull;
    for (unsigned i = 0; i < N; i++) {
        seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
        text[i] = (uint8_t)(seed | 1);
    }
    text[N - 123] = 0;
    unsigned len = 0;
    const __m128i zero = _mm_setzero_si128();
    for (;; len += 16) {
        int mask = _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(text + len)), zero));
        if (mask) { len += (unsigned)__builtin_ctz((unsigned)mask); break; }
    }
    for (unsigned i = 0; i + 16 <= N; i += 16)
        _mm_storeu_si128((__m128i *)(copy + i + 3), _mm_loadu_si128((const __m128i *)(text + i)));
    __m128i sad = _mm_setzero_si128();
    for (unsigned i = 0; i + 16 <= N; i += 16)
        sad = _mm_add_epi64(sad, _mm_sad_epu8(_mm_loadu_si128((const __m128i *)(copy + i)), zero));
    __m128i mixed = _mm_xor_si128(_mm_shuffle_epi32(sad, 0x4E), _mm_slli_si128(sad, 3));
    mixed = _mm_or_si128(_mm_unpacklo_epi8(mixed, sad), _mm_srli_epi32(mixed, 5));
    return (uint64_t)len << 48 ^ (uint64_t)_mm_cvtsi128_si64(mixed) ^ (uint64_t)_mm_extract_epi16(mixed, 5);
}

/// Extended precision on the x87: a long-double series and its conversion.
static uint64_t extended(void) {
    long double e = 1, term = 1;
    for (int k = 1; k < 30; k++) { term /= k; e += term; }
    long double scaled = e * 1e15L;
    return (uint64_t)(long long)scaled ^ bits((double)e);
}

struct results { unsigned scale; uint64_t scalar, packed, bytes, extended; };

static void work(void *arg) {
    struct results *r = arg;
    unsigned scale = r->scale;
    r->scalar = scalar(scale);
    r->packed = packed(scale);
    r->bytes = bytes();
    r->extended = extended();
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    static struct results r;
    r.scale = (unsigned)sv_cmdline_u64("scale", 1);
    sv_run_user(work, &r);
    sv_printf("scalar %lx\npacked %lx\nbytes %lx\nextended %lx\n", r.scalar, r.packed, r.bytes, r.extended);
    return 0;
}
