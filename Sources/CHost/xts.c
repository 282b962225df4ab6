#define _GNU_SOURCE
#include "host_xts.h"

#include <cpuid.h>
#include <errno.h>
#include <immintrin.h>
#include <string.h>
#include <sys/random.h>

#define AESNI __attribute__((target("aes,sse4.1")))

int host_aes_available(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    return (c & bit_AES) != 0 && (c & bit_SSE4_1) != 0;
}

int host_random_bytes(void *buffer, size_t length) {
    uint8_t *p = buffer;
    while (length > 0) {
        ssize_t n = getrandom(p, length, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        p += n;
        length -= (size_t)n;
    }
    return 0;
}

/* One AES-128 key-expansion step: `assist` is AESKEYGENASSIST of the previous round key. */
AESNI static __m128i expand_step(__m128i key, __m128i assist) {
    assist = _mm_shuffle_epi32(assist, 0xFF);
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    return _mm_xor_si128(key, assist);
}

#define ROUND_KEY(i, rcon) rk[i] = expand_step(rk[i - 1], _mm_aeskeygenassist_si128(rk[i - 1], rcon))

AESNI static void expand128(__m128i rk[11], const uint8_t key[16]) {
    rk[0] = _mm_loadu_si128((const __m128i *)key);
    ROUND_KEY(1, 0x01); ROUND_KEY(2, 0x02); ROUND_KEY(3, 0x04); ROUND_KEY(4, 0x08); ROUND_KEY(5, 0x10);
    ROUND_KEY(6, 0x20); ROUND_KEY(7, 0x40); ROUND_KEY(8, 0x80); ROUND_KEY(9, 0x1B); ROUND_KEY(10, 0x36);
}

static __m128i *sched(const host_xts_key *k, int which) { return (__m128i *)(k->schedules + which * 11 * 16); }

AESNI void host_xts_init(host_xts_key *k, const uint8_t key[32]) {
    __m128i *enc = sched(k, 0), *dec = sched(k, 1), *tweak = sched(k, 2);
    expand128(enc, key);
    expand128(tweak, key + 16);
    /* The equivalent inverse cipher: reversed order, InvMixColumns on the inner keys. */
    dec[0] = enc[10];
    for (int i = 1; i < 10; i++) dec[i] = _mm_aesimc_si128(enc[10 - i]);
    dec[10] = enc[0];
}

AESNI static inline __m128i encrypt_block(const __m128i *rk, __m128i b) {
    b = _mm_xor_si128(b, rk[0]);
    for (int i = 1; i < 10; i++) b = _mm_aesenc_si128(b, rk[i]);
    return _mm_aesenclast_si128(b, rk[10]);
}

/* The tweak times x in GF(2^128), little-endian as XTS defines it. */
AESNI static inline __m128i times_x(__m128i t) {
    __m128i carries = _mm_srai_epi32(t, 31);                    /* each lane's top bit, spread */
    carries = _mm_shuffle_epi32(carries, 0x93);                 /* to the next lane up; lane 3's wraps to 0 */
    carries = _mm_and_si128(carries, _mm_set_epi32(1, 1, 1, 0x87));
    return _mm_xor_si128(_mm_slli_epi32(t, 1), carries);
}

/* Four blocks at a time keep the AES unit's pipeline full. */
AESNI static void xts(const host_xts_key *k, int decrypt, uint64_t unit, const void *src, void *dst, size_t length) {
    const __m128i *rk = sched(k, decrypt ? 1 : 0);
    __m128i t = encrypt_block(sched(k, 2), _mm_set_epi64x(0, (long long)unit));
    const __m128i *in = src;
    __m128i *out = dst;
    size_t blocks = length / 16, i = 0;
    for (; i + 4 <= blocks; i += 4) {
        __m128i t0 = t, t1 = times_x(t0), t2 = times_x(t1), t3 = times_x(t2);
        t = times_x(t3);
        __m128i b0 = _mm_xor_si128(_mm_loadu_si128(in + i), _mm_xor_si128(t0, rk[0]));
        __m128i b1 = _mm_xor_si128(_mm_loadu_si128(in + i + 1), _mm_xor_si128(t1, rk[0]));
        __m128i b2 = _mm_xor_si128(_mm_loadu_si128(in + i + 2), _mm_xor_si128(t2, rk[0]));
        __m128i b3 = _mm_xor_si128(_mm_loadu_si128(in + i + 3), _mm_xor_si128(t3, rk[0]));
        if (decrypt) {
            for (int r = 1; r < 10; r++) {
                b0 = _mm_aesdec_si128(b0, rk[r]); b1 = _mm_aesdec_si128(b1, rk[r]);
                b2 = _mm_aesdec_si128(b2, rk[r]); b3 = _mm_aesdec_si128(b3, rk[r]);
            }
            b0 = _mm_aesdeclast_si128(b0, rk[10]); b1 = _mm_aesdeclast_si128(b1, rk[10]);
            b2 = _mm_aesdeclast_si128(b2, rk[10]); b3 = _mm_aesdeclast_si128(b3, rk[10]);
        } else {
            for (int r = 1; r < 10; r++) {
                b0 = _mm_aesenc_si128(b0, rk[r]); b1 = _mm_aesenc_si128(b1, rk[r]);
                b2 = _mm_aesenc_si128(b2, rk[r]); b3 = _mm_aesenc_si128(b3, rk[r]);
            }
            b0 = _mm_aesenclast_si128(b0, rk[10]); b1 = _mm_aesenclast_si128(b1, rk[10]);
            b2 = _mm_aesenclast_si128(b2, rk[10]); b3 = _mm_aesenclast_si128(b3, rk[10]);
        }
        _mm_storeu_si128(out + i, _mm_xor_si128(b0, t0));
        _mm_storeu_si128(out + i + 1, _mm_xor_si128(b1, t1));
        _mm_storeu_si128(out + i + 2, _mm_xor_si128(b2, t2));
        _mm_storeu_si128(out + i + 3, _mm_xor_si128(b3, t3));
    }
    for (; i < blocks; i++) {
        __m128i b = _mm_xor_si128(_mm_loadu_si128(in + i), _mm_xor_si128(t, rk[0]));
        for (int r = 1; r < 10; r++) b = decrypt ? _mm_aesdec_si128(b, rk[r]) : _mm_aesenc_si128(b, rk[r]);
        b = decrypt ? _mm_aesdeclast_si128(b, rk[10]) : _mm_aesenclast_si128(b, rk[10]);
        _mm_storeu_si128(out + i, _mm_xor_si128(b, t));
        t = times_x(t);
    }
}

void host_xts_encrypt(const host_xts_key *k, uint64_t unit, const void *src, void *dst, size_t length) {
    xts(k, 0, unit, src, dst, length);
}

void host_xts_decrypt(const host_xts_key *k, uint64_t unit, const void *src, void *dst, size_t length) {
    xts(k, 1, unit, src, dst, length);
}
