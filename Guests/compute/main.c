// summary: integer workloads at CPL3 (sieve, CRC-32, heapsort, SHA-256-style mixing) with checksums; scale=N
#include "sv.h"

#define SIEVE_LIMIT 1000000u
#define CRC_BYTES (256u * 1024u)
#define SORT_COUNT 20000u
#define MIX_BLOCKS 2048u

static uint8_t composite[SIEVE_LIMIT];
static uint8_t crc_data[CRC_BYTES];
static uint32_t crc_table[256];
static uint32_t sort_data[SORT_COUNT];

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    return *s = x;
}

static uint32_t sieve(void) {
    memset(composite, 0, sizeof composite);
    uint32_t count = 0;
    for (uint32_t i = 2; i < SIEVE_LIMIT; i++) {
        if (composite[i]) continue;
        count++;
        for (uint64_t j = (uint64_t)i * i; j < SIEVE_LIMIT; j += i) composite[j] = 1;
    }
    return count;
}

static uint32_t crc32(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
    uint64_t seed = 0x9E3779B97F4A7C15ull;
    for (uint32_t i = 0; i < CRC_BYTES; i++) crc_data[i] = (uint8_t)xorshift(&seed);
    uint32_t crc = 0xFFFFFFFFu;
    for (uint32_t i = 0; i < CRC_BYTES; i++) crc = crc_table[(crc ^ crc_data[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

static void sift_down(uint32_t *a, uint32_t start, uint32_t end) {
    uint32_t root = start;
    while (2 * root + 1 <= end) {
        uint32_t child = 2 * root + 1, swap = root;
        if (a[swap] < a[child]) swap = child;
        if (child + 1 <= end && a[swap] < a[child + 1]) swap = child + 1;
        if (swap == root) return;
        uint32_t t = a[root]; a[root] = a[swap]; a[swap] = t;
        root = swap;
    }
}

static uint32_t heapsort_checksum(void) {
    uint64_t seed = 0x2545F4914F6CDD1Dull;
    for (uint32_t i = 0; i < SORT_COUNT; i++) sort_data[i] = (uint32_t)xorshift(&seed);
    for (int64_t start = (SORT_COUNT - 2) / 2; start >= 0; start--) sift_down(sort_data, (uint32_t)start, SORT_COUNT - 1);
    for (uint32_t end = SORT_COUNT - 1; end > 0; end--) {
        uint32_t t = sort_data[0]; sort_data[0] = sort_data[end]; sort_data[end] = t;
        sift_down(sort_data, 0, end - 1);
    }
    uint32_t sum = 0;
    for (uint32_t i = 0; i < SORT_COUNT; i++) {
        if (i && sort_data[i - 1] > sort_data[i]) return 0xBAD50127u;  /* not sorted */
        sum = sum * 31 + sort_data[i];
    }
    return sum;
}

static inline uint32_t rotr(uint32_t x, unsigned n) { return (x >> n) | (x << (32 - n)); }

/* SHA-256's compression structure (message schedule, Σ/σ functions, Ch, Maj) over
 * pseudo-random blocks; round constants come from a generator, not the standard table. */
static uint32_t sha_mix(void) {
    uint32_t h[8] = { 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19 };
    uint64_t seed = 0xD1B54A32D192ED03ull;
    uint32_t w[64];
    for (uint32_t b = 0; b < MIX_BLOCKS; b++) {
        for (int i = 0; i < 16; i++) w[i] = (uint32_t)xorshift(&seed);
        for (int i = 16; i < 64; i++) {
            uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
            uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16] + s0 + w[i - 7] + s1;
        }
        uint32_t a = h[0], bb = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
        uint32_t k = 0x428a2f98;
        for (int i = 0; i < 64; i++) {
            k = k * 1664525u + 1013904223u;
            uint32_t S1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
            uint32_t ch = (e & f) ^ (~e & g);
            uint32_t t1 = hh + S1 + ch + k + w[i];
            uint32_t S0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22);
            uint32_t maj = (a & bb) ^ (a & c) ^ (bb & c);
            uint32_t t2 = S0 + maj;
            hh = g; g = f; f = e; e = d + t1; d = c; c = bb; bb = a; a = t1 + t2;
        }
        h[0] += a; h[1] += bb; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
    }
    return h[0] ^ h[1] ^ h[2] ^ h[3] ^ h[4] ^ h[5] ^ h[6] ^ h[7];
}

static void workloads(void *arg) {
    uint64_t scale = *(uint64_t *)arg;
    uint32_t primes = 0, crc = 0, sorted = 0, mix = 0;
    for (uint64_t r = 0; r < scale; r++) {
        primes = sieve();
        crc = crc32();
        sorted = heapsort_checksum();
        mix = sha_mix();
    }
    sv_printf("sieve: primes below %u = %u\n", SIEVE_LIMIT, primes);
    sv_printf("crc32: checksum=%08x\n", crc);
    sv_printf("heapsort: checksum=%08x\n", sorted);
    sv_printf("sha-mix: checksum=%08x\n", mix);
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    uint64_t scale = sv_cmdline_u64("scale", 1);
    if (scale == 0) scale = 1;
    sv_run_user(workloads, &scale);
    sv_printf("compute: done (scale %lu)\n", scale);
    return 0;
}
