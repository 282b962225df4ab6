// summary: S10 SMEP/SMAP/WP and the user/kernel alias of one page: every probe's fault (error code, CR2) or success, one 'cell' line each; probe=N runs one, once=1 only with SMEP/SMAP off, popf=1 sets AC with POPF
// test-guest
#include "paging.h"
#include "sv.h"

/* The guest builds its own address space: RAM identity-mapped supervisor-only (2 MiB
 * pages) for the kernel, and above 512 GiB a few 4 KiB pages, among them three mappings
 * of one physical page (ALIAS): a user mapping (read-only, executable), a kernel mapping
 * (writable, not executable) and a kernel executable mapping (for MBEC, where the VMM
 * denies supervisor execution of the page in the second level). Each probe is one access
 * that either completes or takes #PF; the #PF handler records error code and CR2 and
 * resumes after the probe. A fault at CPL3 abandons the user context. */

#define ALIAS_PA 0x7FF000ull
#define UDATA_PA 0x7FE000ull
#define KRO_PA 0x7FD000ull
#define USTACK_PA 0x7FB000ull  /* two pages */
#define ULDT_PA 0x7FA000ull

#define UCODE (SV_USER_SPACE + 0x0000)  /* ALIAS: user, read-only, executable */
#define KALIAS (SV_USER_SPACE + 0x1000) /* ALIAS: supervisor, writable, NX */
#define UDATA (SV_USER_SPACE + 0x2000)  /* user, writable, NX */
#define KRO (SV_USER_SPACE + 0x3000)    /* supervisor, read-only, NX */
#define USTACK (SV_USER_SPACE + 0x4000) /* user, writable, NX (two pages) */
#define KXALIAS (SV_USER_SPACE + 0x6000) /* ALIAS: supervisor, read-only, executable */
#define ULDT (SV_USER_SPACE + 0x7000)   /* user, writable, NX: an LDT */

static uint64_t pml4[512] __attribute__((aligned(4096)));
static uint64_t pdpt_k[512] __attribute__((aligned(4096)));
static uint64_t pd_k[512] __attribute__((aligned(4096)));
static uint64_t pdpt_u[512] __attribute__((aligned(4096)));
static uint64_t pd_u[512] __attribute__((aligned(4096)));
static uint64_t pt_u[512] __attribute__((aligned(4096)));

struct gate { uint16_t lo, sel; uint8_t ist, attr; uint16_t mid; uint32_t hi, zero; } __attribute__((packed));
struct dtr { uint16_t limit; uint64_t base; } __attribute__((packed));
static struct gate idt[256] __attribute__((aligned(16)));
static uint64_t gdt[9] __attribute__((aligned(16)));

volatile uint64_t pf_hit, pf_code, pf_cr2, pf_resume, pf_rsp, kernel_rsp;
extern void pf_stub(void), user_done_isr(void);
extern uint64_t probe_read(uint64_t a), probe_write(uint64_t a, uint64_t v), probe_exec(uint64_t a), probe_load_fs(uint64_t sel);
extern uint64_t enter_user(uint64_t rip, uint64_t rsp, uint64_t arg);

__asm__(
    ".text\n"
    "pf_stub:\n"
    "  push %rax\n"
    "  mov 8(%rsp), %rax\n  mov %rax, pf_code(%rip)\n"
    "  mov %cr2, %rax\n  mov %rax, pf_cr2(%rip)\n"
    "  movq $1, pf_hit(%rip)\n"
    "  testb $3, 24(%rsp)\n  jnz 1f\n"
    "  mov pf_resume(%rip), %rax\n  mov %rax, 16(%rsp)\n"
    "  mov pf_rsp(%rip), %rax\n  mov %rax, 40(%rsp)\n"
    "  pop %rax\n  add $8, %rsp\n  iretq\n"
    "1: mov $-1, %rax\n  jmp user_return\n"
    /* int3 from CPL3: the user code is done; RAX is its result. */
    "user_done_isr:\n"
    "user_return:\n"
    "  mov kernel_rsp(%rip), %rsp\n"
    "  pop %r15\n  pop %r14\n  pop %r13\n  pop %r12\n  pop %rbp\n  pop %rbx\n  ret\n"
    /* enter_user(rip, rsp, arg): IRETQ to CPL3 with RDI = arg. */
    "enter_user:\n"
    "  push %rbx\n  push %rbp\n  push %r12\n  push %r13\n  push %r14\n  push %r15\n"
    "  mov %rsp, kernel_rsp(%rip)\n"
    "  pushq $0x1b\n  push %rsi\n  pushq $0x3002\n  pushq $0x23\n  push %rdi\n"
    "  mov %rdx, %rdi\n  xor %eax, %eax\n  iretq\n"
    "probe_read:\n"
    "  movq $0, pf_hit(%rip)\n  lea 1f(%rip), %rax\n  mov %rax, pf_resume(%rip)\n  mov %rsp, pf_rsp(%rip)\n"
    "  movb (%rdi), %al\n"
    "1: mov pf_hit(%rip), %rax\n  ret\n"
    "probe_write:\n"
    "  movq $0, pf_hit(%rip)\n  lea 1f(%rip), %rax\n  mov %rax, pf_resume(%rip)\n  mov %rsp, pf_rsp(%rip)\n"
    "  movb %sil, (%rdi)\n"
    "1: mov pf_hit(%rip), %rax\n  ret\n"
    "probe_exec:\n"
    "  movq $0, pf_hit(%rip)\n  lea 1f(%rip), %rax\n  mov %rax, pf_resume(%rip)\n  mov %rsp, pf_rsp(%rip)\n"
    "  call *%rdi\n"
    "1: mov pf_hit(%rip), %rax\n  ret\n"
    "probe_load_fs:\n"
    "  movq $0, pf_hit(%rip)\n  lea 1f(%rip), %rax\n  mov %rax, pf_resume(%rip)\n  mov %rsp, pf_rsp(%rip)\n"
    "  mov %di, %fs\n"
    "1: mov $0x10, %ax\n  mov %ax, %fs\n  mov pf_hit(%rip), %rax\n  ret\n");

static void set_gate(int v, void (*fn)(void), int dpl) {
    uint64_t h = (uint64_t)fn;
    idt[v].lo = (uint16_t)h; idt[v].sel = 0x08; idt[v].ist = 0; idt[v].attr = (uint8_t)(0x8E | (dpl << 5));
    idt[v].mid = (uint16_t)(h >> 16); idt[v].hi = (uint32_t)(h >> 32); idt[v].zero = 0;
}

static uint64_t read_cr0(void) { uint64_t v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static void write_cr0(uint64_t v) { __asm__ volatile("mov %0, %%cr0" ::"r"(v) : "memory"); }
static uint64_t read_cr4(void) { uint64_t v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static void write_cr4(uint64_t v) { __asm__ volatile("mov %0, %%cr4" ::"r"(v) : "memory"); }
static void stac(void) { __asm__ volatile(".byte 0x0f,0x01,0xcb" ::: "memory"); }
static void clac(void) { __asm__ volatile(".byte 0x0f,0x01,0xca" ::: "memory"); }

static unsigned smep_on, smap_on, wp_on, ac_on, has_smep, has_smap, failures;

static void report(const char *name, uint64_t fault) {
    sv_printf("cell %s smep=%u smap=%u wp=%u ac=%u fault=%lu code=0x%lx cr2=0x%lx\n", name, smep_on, smap_on, wp_on, ac_on,
              fault, fault ? pf_code : 0ul, fault ? pf_cr2 : 0ul);
}

static void set_cr4(unsigned smep, unsigned smap) {
    uint64_t cr4 = read_cr4() & ~((1ull << 20) | (1ull << 21));
    if (smep) cr4 |= 1ull << 20;
    if (smap) cr4 |= 1ull << 21;
    write_cr4(cr4);
    smep_on = smep; smap_on = smap;
}

/* RFLAGS.AC: STAC/CLAC, or POPF with acvia=popf (this host's nested KVM cannot emulate
 * STAC/CLAC at CPL0). */
static unsigned ac_via_popf;
static void set_ac(unsigned on) {
    if (ac_via_popf) {
        uint64_t f;
        __asm__ volatile("pushfq; pop %0" : "=r"(f));
        f = on ? f | (1ull << 18) : f & ~(1ull << 18);
        __asm__ volatile("push %0; popfq" ::"r"(f) : "memory", "cc");
    } else if (on) {
        stac();
    } else {
        clac();
    }
    ac_on = on;
}

static void set_wp(unsigned on) {
    uint64_t cr0 = read_cr0();
    write_cr0(on ? cr0 | (1ull << 16) : cr0 & ~(1ull << 16));
    wp_on = on;
}

/* User code: at UCODE+0 "mov $imm32, %eax; int3"; at +0x10 "movb (%rdi), %al; int3";
 * at +0x18 "movb %al, (%rdi); int3"; at +0x20 "ret" (for kernel execute probes). */
static void write_user_code(volatile uint8_t *page, uint32_t imm) {
    page[0] = 0xB8; page[1] = (uint8_t)imm; page[2] = (uint8_t)(imm >> 8); page[3] = (uint8_t)(imm >> 16); page[4] = (uint8_t)(imm >> 24);
    page[5] = 0xCC;
    page[0x10] = 0x8A; page[0x11] = 0x07; page[0x12] = 0xCC;
    page[0x18] = 0x88; page[0x19] = 0x07; page[0x1A] = 0xCC;
    page[0x20] = 0xC3;
}

static uint64_t user_run(uint64_t rip, uint64_t arg) {
    pf_hit = 0;
    uint64_t r = enter_user(rip, USTACK + 0x2000, arg);
    return r;
}

/* Probes under the current CR4/AC/WP; `only` picks one (0: all). */
static void probes(unsigned only) {
    if (!only || only == 1) report("k-read-user", probe_read(UDATA));
    if (!only || only == 2) report("k-write-user", probe_write(UDATA, 0x5A));
    if (!only || only == 3) report("k-exec-user-alias", probe_exec(UCODE + 0x20));
    if (!only || only == 4) report("k-read-kernel-alias", probe_read(KALIAS));
    if (!only || only == 5) report("k-exec-kernel-alias", probe_exec(KALIAS + 0x20));
    if (!only || only == 6) report("k-exec-kx-alias", probe_exec(KXALIAS + 0x20));
    if (!only || only == 7) report("k-read-user-alias", probe_read(UCODE));
    if (!only || only == 8) report("k-implicit-ldt-user", probe_load_fs(0x4));
    if (!only || only == 9) report("k-write-kernel-ro", probe_write(KRO, 0x5A));
    if (!only || only == 10) report("u-exec-user-alias", user_run(UCODE + 0x10, UDATA) == (uint64_t)-1);
    if (!only || only == 11) report("u-read-kernel-alias", user_run(UCODE + 0x10, KALIAS) == (uint64_t)-1);
    if (!only || only == 12) report("u-write-user-alias", user_run(UCODE + 0x18, UCODE) == (uint64_t)-1);
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    if (cpu != 0) return 0;
    unsigned only = (unsigned)sv_cmdline_u64("probe", 0);
    ac_via_popf = sv_cmdline_u64("popf", 0) != 0;
    unsigned once = (unsigned)sv_cmdline_u64("once", 0);  /* only SMEP, SMAP and AC off */
    uint32_t a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    has_smep = (b >> 7) & 1; has_smap = (b >> 20) & 1;
    sv_printf("features smep=%u smap=%u\n", has_smep, has_smap);

    /* The address space. */
    for (int i = 0; i < 512; i++) pd_k[i] = ((uint64_t)i << 21) | SV_PTE_P | SV_PTE_W | SV_PTE_PS;
    pdpt_k[0] = (uint64_t)pd_k | SV_PTE_P | SV_PTE_W;
    pml4[0] = (uint64_t)pdpt_k | SV_PTE_P | SV_PTE_W;
    pml4[1] = (uint64_t)pdpt_u | SV_PTE_P | SV_PTE_W | SV_PTE_U;
    pdpt_u[0] = (uint64_t)pd_u | SV_PTE_P | SV_PTE_W | SV_PTE_U;
    pd_u[0] = (uint64_t)pt_u | SV_PTE_P | SV_PTE_W | SV_PTE_U;
    pt_u[0] = ALIAS_PA | SV_PTE_P | SV_PTE_U;
    pt_u[1] = ALIAS_PA | SV_PTE_P | SV_PTE_W | SV_PTE_NX;
    pt_u[2] = UDATA_PA | SV_PTE_P | SV_PTE_W | SV_PTE_U | SV_PTE_NX;
    pt_u[3] = KRO_PA | SV_PTE_P | SV_PTE_NX;
    pt_u[4] = USTACK_PA | SV_PTE_P | SV_PTE_W | SV_PTE_U | SV_PTE_NX;
    pt_u[5] = (USTACK_PA + 0x1000) | SV_PTE_P | SV_PTE_W | SV_PTE_U | SV_PTE_NX;
    pt_u[6] = ALIAS_PA | SV_PTE_P;
    pt_u[7] = ULDT_PA | SV_PTE_P | SV_PTE_W | SV_PTE_U | SV_PTE_NX;
    write_user_code((volatile uint8_t *)ALIAS_PA, 0x11111111);
    ((volatile uint64_t *)ULDT_PA)[0] = 0x00CF93000000FFFFull;  /* a data descriptor */

    /* Our IDT (the runtime's, with #PF and the user-return int3 replaced) and a GDT with
     * an LDT descriptor for the user-page LDT. */
    struct dtr cur;
    __asm__ volatile("sidt %0" : "=m"(cur));
    memcpy(idt, (void *)cur.base, sizeof idt);
    set_gate(14, pf_stub, 0);
    set_gate(3, user_done_isr, 3);
    struct dtr idtr = { sizeof idt - 1, (uint64_t)idt };
    __asm__ volatile("lidt %0" ::"m"(idtr));
    struct dtr gcur;
    __asm__ volatile("sgdt %0" : "=m"(gcur));
    memcpy(gdt, (void *)gcur.base, 7 * 8);
    gdt[7] = 0x0000820000000FFFull | ((ULDT & 0xFFFFFF) << 16) | (((ULDT >> 24) & 0xFF) << 56);
    gdt[8] = ULDT >> 32;
    struct dtr gdtr = { sizeof gdt - 1, (uint64_t)gdt };
    __asm__ volatile("lgdt %0" ::"m"(gdtr));
    __asm__ volatile("lldt %w0" ::"r"((uint16_t)0x38));
    sv_write_cr3((uint64_t)pml4);
    set_wp(1);

    for (unsigned smep = 0; smep <= 1; smep++)
        for (unsigned smap = 0; smap <= 1; smap++) {
            if ((smep && !has_smep) || (smap && !has_smap) || (once && (smep || smap))) continue;
            set_cr4(smep, smap);
            for (unsigned ac = 0; ac <= 1; ac++) {
                if (ac && (!has_smap || once)) continue;
                set_ac(ac);
                probes(only);
            }
            set_ac(0);
        }
    set_cr4(0, 0);

    if (!only) {
        /* CR0.WP off: the kernel may write read-only pages. */
        set_wp(0);
        report("k-write-kernel-ro", probe_write(KRO, 0x5A));
        set_wp(1);
        /* The alias: user code runs from the user mapping; the kernel rewrites it through
         * the kernel mapping; the user runs the new code. */
        uint64_t before = user_run(UCODE, 0);
        volatile uint8_t *k = (volatile uint8_t *)KALIAS;
        k[1] = 0x22; k[2] = 0x22; k[3] = 0x22; k[4] = 0x22;
        uint64_t after = user_run(UCODE, 0);
        sv_printf("alias user-code before=0x%lx after=0x%lx\n", before, after);
        if (before != 0x11111111 || after != 0x22222222) failures++;
    }
    sv_printf("smep-smap: done\n");
    return failures ? 1 : 0;
}
