// summary: S11 victim: fills private pages with a known pattern, checksums them before and after the host's attack (port 0x82)
#include "sv.h"

/* The host's attack hook (Swiftvisor's ConfidentialAttackPort): the data's address, then
 * phase numbers; the host acts at each exit. */
#define ATTACK_PORT 0x82
#define PAGES 16

static uint8_t data[PAGES][4096] __attribute__((aligned(4096)));

/* The pattern, stored scrambled so it appears in guest memory only once the guest built it. */
static const uint8_t scrambled[16] = { 'C' ^ 0x5A, 'O' ^ 0x5A, 'N' ^ 0x5A, 'F' ^ 0x5A, 'I' ^ 0x5A, 'D' ^ 0x5A, 'E' ^ 0x5A, 'N' ^ 0x5A,
                                       'T' ^ 0x5A, 'I' ^ 0x5A, 'A' ^ 0x5A, 'L' ^ 0x5A, '-' ^ 0x5A, 'S' ^ 0x5A, '1' ^ 0x5A, '1' ^ 0x5A };

static void fill(unsigned version) {
    for (unsigned p = 0; p < PAGES; p++)
        for (unsigned i = 0; i < 4096; i += 16)
            for (unsigned k = 0; k < 16; k++)
                data[p][i + k] = k < 12 ? (uint8_t)(scrambled[k] ^ 0x5A) : (uint8_t)(k == 12 ? 'A' + p : k == 13 ? '0' + version : (scrambled[k] ^ 0x5A));
}

static uint64_t checksum(void) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (unsigned p = 0; p < PAGES; p++)
        for (unsigned i = 0; i < 4096; i++) h = (h ^ data[p][i]) * 0x100000001b3ull;
    return h;
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    if (cpu) return 0;
    sv_printf("confidential: %s\n", !(bi->flags & SV_BOOT_CONFIDENTIAL) ? "no" : (bi->flags & SV_BOOT_SNP) ? "SEV-SNP" : "SEV");
    sv_outl(ATTACK_PORT, (uint32_t)(uint64_t)data);
    fill(1);
    sv_outl(ATTACK_PORT, 1);  /* version 1 in memory: the host may record it */
    fill(2);
    /* What a driver would hand a device: page 0 copied into the shared bounce region. */
    uint8_t *bounce = sv_shared_alloc(4096, 4096);
    if (bounce) memcpy(bounce, data[0], 4096);
    uint64_t expected = checksum();
    sv_printf("checksum before: %lx\n", (unsigned long)expected);
    sv_outl(ATTACK_PORT, 2);  /* the host attacks now, if told to */
    uint64_t now = checksum();
    sv_printf("checksum after:  %lx\n", (unsigned long)now);
    if (now != expected) {
        sv_printf("DATA CHANGED: the guest computed on memory the host altered\n");
        return 3;
    }
    sv_printf("data intact\n");
    return 0;
}
