/* AES-128-XTS (IEEE 1619) with AES-NI: the memory cipher of confidential VMs. One data
 * unit is a 4 KiB page and its tweak is the page's frame address, as a memory controller
 * that encrypts by physical address. */
#ifndef HOST_XTS_H
#define HOST_XTS_H

#include <stddef.h>
#include <stdint.h>

/* Expanded keys: data-key encryption and decryption schedules, tweak-key schedule. */
typedef struct host_xts_key {
    _Alignas(16) uint8_t schedules[3 * 11 * 16];
} host_xts_key;

/* 1 when the CPU has AES-NI (and the XTS functions may be called). */
int host_aes_available(void);
/* `key`: 32 bytes, data key then tweak key. */
void host_xts_init(host_xts_key *k, const uint8_t key[32]);
/* `length`: a multiple of 16. `src` and `dst` may be the same buffer. */
void host_xts_encrypt(const host_xts_key *k, uint64_t unit, const void *src, void *dst, size_t length);
void host_xts_decrypt(const host_xts_key *k, uint64_t unit, const void *src, void *dst, size_t length);
/* Fills `buffer` from the kernel's CSPRNG (getrandom); 0 or -errno. */
int host_random_bytes(void *buffer, size_t length);

#endif
