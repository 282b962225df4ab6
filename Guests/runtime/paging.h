/* Guest page tables for the paging workloads (scenario S5): 4 KiB frames from a physical
 * region, and 4-level address spaces that share the boot identity map (PML4 slot 0, where
 * the kernel, its stacks and the runtime live) and map their own pages above 512 GiB. */
#ifndef SV_PAGING_H
#define SV_PAGING_H

#include <stdint.h>

#define SV_PTE_P 0x1ull
#define SV_PTE_W 0x2ull
#define SV_PTE_U 0x4ull
#define SV_PTE_A 0x20ull
#define SV_PTE_D 0x40ull
#define SV_PTE_PS 0x80ull
#define SV_PTE_NX (1ull << 63)
#define SV_PTE_ADDR 0x0007FFFFFFFFF000ull  /* bits 12–50: bit 51 is a confidential VM's C-bit */
/* The first address past the identity map's PML4 slot. */
#define SV_USER_SPACE 0x8000000000ull

static inline uint64_t sv_read_cr3(void) { uint64_t v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline void sv_write_cr3(uint64_t v) { __asm__ volatile("mov %0, %%cr3" ::"r"(v) : "memory"); }
static inline void sv_invlpg(uint64_t va) { __asm__ volatile("invlpg (%0)" ::"r"(va) : "memory"); }

/* Frames come from [start, end) (identity-mapped, so a frame's address is usable as is). */
void sv_frames_init(uint64_t start, uint64_t end);
uint64_t sv_frame_alloc(void);          /* zeroed; 0 when none is left */
void sv_frame_free(uint64_t pa);
uint64_t sv_frames_in_use(void);

uint64_t sv_as_create(void);            /* a PML4 sharing slot 0 of the current one */
/* Maps va → pa with `flags` (P is implied), allocating tables (P|W|U); 0 on success. */
int sv_as_map(uint64_t pml4, uint64_t va, uint64_t pa, uint64_t flags);
/* The PTE of va (0: not mapped). */
uint64_t sv_as_lookup(uint64_t pml4, uint64_t va);
/* Clears va's PTE (INVLPG when pml4 is the current CR3); returns the frame it mapped. */
uint64_t sv_as_unmap(uint64_t pml4, uint64_t va);
/* Frees every table below slots 1..511 and the PML4 itself (not the mapped frames). */
void sv_as_destroy(uint64_t pml4);

#endif
