/* 32-bit half of the multiboot entry (multiboot.S): loads the embedded guest ELF64 and
 * writes the machine of docs/guest-abi.md (what Sources/VMM/BootLayout.swift and the ELF
 * loader do for our engines), for one vCPU:
 *   0x1000 GDT (null, 0x08 code64 DPL0, 0x10 data DPL0), 0x2000 boot info, 0x3000 command
 *   line, 0x10000.. identity map of max(RAM, 4 GiB) with 2 MiB present|writable|user pages,
 *   everything else below 1 MiB zero (up to the VGA hole at 0xA0000).
 * The command line is the multiboot one less its first word: QEMU passes
 * "<kernel path> <-append text>". RAM size comes from the multiboot memory info (so
 * -m 64M gives ram_size = 64 MiB, as --memory 64M does).
 * On an error it prints "qemu-multiboot: ..." on COM1 and exits through port 0xF4 with
 * 0x7E (QEMU's isa-debug-exit status (0x7E << 1) | 1 = 253). */
#include <stddef.h>
#include <stdint.h>

struct mb_info {
    uint32_t flags;
    uint32_t mem_lower, mem_upper;   /* KiB below 640K / above 1 MiB (flags bit 0) */
    uint32_t boot_device;
    uint32_t cmdline;                /* flags bit 2 */
};

#define MB_BOOT_MAGIC 0x2BADB002u
#define GDT_ADDR 0x1000u
#define BOOT_INFO_ADDR 0x2000u
#define CMDLINE_ADDR 0x3000u
#define CMDLINE_CAP 4095u
#define PML4_ADDR 0x10000u
#define LOW_RAM_END 0xA0000u
#define IMAGE_BASE 0x100000u
#define EXIT_LOADER_FAILED 0x7E

extern const uint8_t guest_elf[], guest_elf_end[];
extern uint8_t __image_start[];

uint64_t guest_entry;   /* read by multiboot.S */
uint32_t efer_value;    /* ditto: SCE | LME, plus NXE when the CPU has NX */

static char cmdline_copy[CMDLINE_CAP + 1];

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void serial_puts(const char *s) {
    for (; *s; s++) {
        while (!(inb(0x3FD) & 0x20)) {}
        outb(0x3F8, (uint8_t)*s);
    }
}

__attribute__((noreturn)) static void fail(const char *why) {
    serial_puts("qemu-multiboot: ");
    serial_puts(why);
    serial_puts("\n");
    for (;;) {
        outb(0xF4, EXIT_LOADER_FAILED);
        __asm__ volatile("cli; hlt");
    }
}

/* The compiler may emit calls to these. */
void *memset(void *d, int c, size_t n) {
    uint8_t *p = d;
    while (n--) *p++ = (uint8_t)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n) {
    uint8_t *p = d;
    const uint8_t *q = s;
    while (n--) *p++ = *q++;
    return d;
}

/* Physical memory as a pointer (everything is identity-mapped / unpaged here). Going
 * through asm keeps the compiler from reasoning about address 0. */
static inline uint8_t *phys(uint32_t addr) {
    uint8_t *p;
    __asm__("" : "=r"(p) : "0"(addr));
    return p;
}

static void zero_phys(uint32_t addr, uint32_t len) {
    uint8_t *p = phys(addr);
    __asm__ volatile("rep stosb" : "+D"(p), "+c"(len) : "a"(0) : "memory");
}

static inline void store64(uint32_t addr, uint64_t v) { *(volatile uint64_t *)phys(addr) = v; }
static inline void store32(uint32_t addr, uint32_t v) { *(volatile uint32_t *)phys(addr) = v; }
static inline void store16(uint32_t addr, uint16_t v) { *(volatile uint16_t *)phys(addr) = v; }

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t rd32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t rd64(const uint8_t *p) { return rd32(p) | (uint64_t)rd32(p + 4) << 32; }

static int cpu_has_nx(void) {
    uint32_t a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x80000000u));
    if (a < 0x80000001u) return 0;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x80000001u));
    return (d >> 20) & 1;
}

void loader_main(uint32_t magic, const struct mb_info *mbi) {
    if (magic != MB_BOOT_MAGIC) fail("not started by a multiboot loader");
    if (!(mbi->flags & 1)) fail("no memory info from the loader");
    /* RAM from 0 to the end of the block at 1 MiB, rounded up to 2 MiB (our engines' RAM
     * sizes are multiples of 2 MiB): the firmware keeps its ACPI tables in the last pages
     * of -m, which multiboot's mem_upper leaves out. */
    uint64_t ram = ((uint64_t)mbi->mem_upper + 1024) * 1024;
    ram = (ram + 0x1FFFFF) & ~(uint64_t)0x1FFFFF;

    /* Command line first: nothing below may overwrite it before it's copied. */
    uint32_t cmd_len = 0;
    if (mbi->flags & 4) {
        const char *s = (const char *)phys(mbi->cmdline);
        while (*s && *s != ' ') s++;   /* the kernel path */
        while (*s == ' ') s++;
        while (s[cmd_len] && cmd_len < CMDLINE_CAP) { cmdline_copy[cmd_len] = s[cmd_len]; cmd_len++; }
    }
    cmdline_copy[cmd_len] = 0;

    /* The guest ELF64: header checks as in Sources/VMM/ELFLoader.swift, in short. */
    const uint8_t *elf = guest_elf;
    uint32_t elf_size = (uint32_t)(guest_elf_end - guest_elf);
    if (elf_size < 64 || rd32(elf) != 0x464C457Fu || elf[4] != 2 || elf[5] != 1 || rd16(elf + 18) != 62)
        fail("embedded guest is not a little-endian x86-64 ELF64");
    uint64_t phoff = rd64(elf + 32);
    uint32_t phentsize = rd16(elf + 54), phnum = rd16(elf + 56);
    if (phentsize < 56 || phoff + (uint64_t)phentsize * phnum > elf_size) fail("bad program header table");

    zero_phys(0, LOW_RAM_END);   /* as the VMM does (it zeroes all of [0, 1 MiB)) */

    int loaded = 0;
    for (uint32_t i = 0; i < phnum; i++) {
        const uint8_t *ph = elf + (uint32_t)phoff + i * phentsize;
        if (rd32(ph) != 1) continue;   /* PT_LOAD */
        uint64_t off = rd64(ph + 8), paddr = rd64(ph + 24), filesz = rd64(ph + 32), memsz = rd64(ph + 40);
        if (filesz > memsz || off + filesz > elf_size) fail("segment outside the ELF file");
        if (paddr < IMAGE_BASE || paddr + memsz > ram) fail("segment below 1 MiB or past RAM");
        if (paddr + memsz > (uint32_t)__image_start) fail("segment overlaps the loader: move it up in multiboot.ld");
        memcpy(phys((uint32_t)paddr), elf + (uint32_t)off, (uint32_t)filesz);
        zero_phys((uint32_t)(paddr + filesz), (uint32_t)(memsz - filesz));
        loaded = 1;
    }
    if (!loaded) fail("ELF has no PT_LOAD segment");
    guest_entry = rd64(elf + 24);

    /* GDT: null, 64-bit code DPL0, data DPL0. */
    store64(GDT_ADDR, 0);
    store64(GDT_ADDR + 8, 0x00AF9B000000FFFFull);
    store64(GDT_ADDR + 16, 0x00CF93000000FFFFull);

    /* Identity map with 2 MiB pages: PML4[0] -> PDPT -> one PD per GiB. */
    const uint64_t flags = 0x7;   /* present, writable, user */
    uint32_t pdpt = PML4_ADDR + 0x1000, first_pd = PML4_ADDR + 0x2000;
    uint32_t gibs = (uint32_t)((ram + (1ull << 30) - 1) >> 30);
    if (gibs < 4) gibs = 4;
    store64(PML4_ADDR, pdpt | flags);
    for (uint32_t g = 0; g < gibs; g++) {
        uint32_t pd = first_pd + g * 0x1000;
        store64(pdpt + g * 8, pd | flags);
        for (uint32_t i = 0; i < 512; i++)
            store64(pd + i * 8, ((uint64_t)g << 30) | ((uint64_t)i << 21) | flags | 0x80);
    }

    /* Command line and boot info. */
    memcpy(phys(CMDLINE_ADDR), cmdline_copy, cmd_len + 1);
    uint32_t b = BOOT_INFO_ADDR;
    store32(b, 0x49425653u);        /* "SVBI" */
    store32(b + 4, 1);              /* version */
    store64(b + 8, ram);
    store32(b + 16, 1);             /* vcpu_count */
    store32(b + 20, 1);             /* hypercall_kind: port doorbell (QEMU has no vmcall handler) */
    store16(b + 24, 0xF6);          /* hypercall_port: QEMU ignores writes there */
    store16(b + 26, 0x3F8);         /* serial_port */
    store16(b + 28, 0xF4);          /* exit_port: isa-debug-exit */
    store16(b + 30, 0);             /* device_count */
    store32(b + 32, cmd_len);
    store64(b + 40, CMDLINE_ADDR);

    efer_value = 0x101u | (cpu_has_nx() ? 0x800u : 0);
}
