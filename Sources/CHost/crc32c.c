// CRC-32C (Castagnoli) for snapshot files and the migration stream: SSE4.2's crc32
// instruction where the CPU has it (three interleaved streams hide its 3-cycle latency),
// else a slicing-by-8 table. Same convention as iSCSI/ext4: pre- and post-inverted.
#include "chost.h"
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define CRC32C_POLY 0x82F63B78u

static uint32_t crc_table[8][256];
static uint32_t shift_table[4][256];  // multiplies a CRC by x^(8*BLOCK) for combining streams
static int crc_hardware = -1;

enum { BLOCK = 2048 };  // bytes per interleaved stream per step


static void crc_setup(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ CRC32C_POLY : c >> 1;
        crc_table[0][i] = c;
    }
    for (int k = 1; k < 8; k++)
        for (int i = 0; i < 256; i++) crc_table[k][i] = (crc_table[k - 1][i] >> 8) ^ crc_table[0][crc_table[k - 1][i] & 0xFF];
    // Advancing a CRC over BLOCK zero bytes is linear: advance the 32 one-bit values, then
    // each table entry is the XOR of the advanced bits it has.
    uint32_t basis[32];
    for (int bit = 0; bit < 32; bit++) {
        uint32_t c = 1u << bit;
        for (int k = 0; k < BLOCK; k++) c = (c >> 8) ^ crc_table[0][c & 0xFF];
        basis[bit] = c;
    }
    for (int byte = 0; byte < 4; byte++)
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t v = 0;
            for (int bit = 0; bit < 8; bit++)
                if (i & (1u << bit)) v ^= basis[8 * byte + bit];
            shift_table[byte][i] = v;
        }
#if defined(__x86_64__)
    __builtin_cpu_init();
    crc_hardware = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#else
    crc_hardware = 0;
#endif
}

static inline uint32_t crc_shift_block(uint32_t crc) {
    return shift_table[0][crc & 0xFF] ^ shift_table[1][(crc >> 8) & 0xFF] ^ shift_table[2][(crc >> 16) & 0xFF] ^
           shift_table[3][crc >> 24];
}

static uint32_t crc_software(uint32_t c, const uint8_t *p, size_t n) {
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= c;
        c = crc_table[7][v & 0xFF] ^ crc_table[6][(v >> 8) & 0xFF] ^ crc_table[5][(v >> 16) & 0xFF] ^
            crc_table[4][(v >> 24) & 0xFF] ^ crc_table[3][(v >> 32) & 0xFF] ^ crc_table[2][(v >> 40) & 0xFF] ^
            crc_table[1][(v >> 48) & 0xFF] ^ crc_table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xFF];
    return c;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t crc_hardware_run(uint32_t c, const uint8_t *p, size_t n) {
    while (n > 0 && ((uintptr_t)p & 7)) { c = __builtin_ia32_crc32qi(c, *p++); n--; }
    // Three independent streams over consecutive blocks, combined by shifting.
    while (n >= 3 * BLOCK) {
        uint64_t a = c, b = 0, d = 0;
        const uint8_t *pb = p + BLOCK, *pd = p + 2 * BLOCK;
        for (size_t i = 0; i < BLOCK; i += 8) {
            uint64_t va, vb, vd;
            memcpy(&va, p + i, 8); memcpy(&vb, pb + i, 8); memcpy(&vd, pd + i, 8);
            a = __builtin_ia32_crc32di(a, va);
            b = __builtin_ia32_crc32di(b, vb);
            d = __builtin_ia32_crc32di(d, vd);
        }
        c = crc_shift_block(crc_shift_block((uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)d;
        p += 3 * BLOCK;
        n -= 3 * BLOCK;
    }
    uint64_t c64 = c;
    while (n >= 8) { uint64_t v; memcpy(&v, p, 8); c64 = __builtin_ia32_crc32di(c64, v); p += 8; n -= 8; }
    c = (uint32_t)c64;
    while (n--) c = __builtin_ia32_crc32qi(c, *p++);
    return c;
}
#endif

uint32_t host_crc32c(uint32_t crc, const void *data, size_t count) {
    // Benign race: every thread computes the same tables and flag.
    if (__builtin_expect(crc_hardware < 0, 0)) crc_setup();
    uint32_t c = ~crc;
#if defined(__x86_64__)
    if (crc_hardware) return ~crc_hardware_run(c, data, count);
#endif
    return ~crc_software(c, data, count);
}

int host_crc32c_is_hardware(void) {
    if (crc_hardware < 0) crc_setup();
    return crc_hardware;
}
