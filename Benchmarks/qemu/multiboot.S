/* Multiboot (v1) entry that gives a Swiftvisor guest the machine of docs/guest-abi.md under
 * QEMU (`qemu-system-x86_64 -kernel image.bin`). QEMU's multiboot loader refuses ELF64
 * images, so the image is a flat binary with the a.out kludge (header flag bit 16, load
 * addresses in the header). It carries the guest's unmodified ELF64 (GUEST_ELF, included
 * below); loader.c copies its PT_LOAD segments to their physical addresses and writes the
 * GDT, boot info, command line and page tables; this file then switches to long mode and
 * enters the guest with the ABI's register state.
 *
 * Build (see Benchmarks/qemu-compare.sh): clang -target i386-unknown-none-elf
 * -DGUEST_ELF='"path/to/guest.elf"' -c multiboot.S; ld.lld -m elf_i386 -T multiboot.ld;
 * llvm-objcopy -O binary. */

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00010002   /* bit 1: memory info wanted; bit 16: a.out kludge addresses */

    .section .multiboot, "a"
    .balign 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long mb_header           /* header_addr */
    .long __image_start       /* load_addr: the file's first byte */
    .long 0                   /* load_end_addr: 0 = the whole file */
    .long __bss_end           /* bss_end_addr: QEMU zeroes file end..here */
    .long mb_entry            /* entry_addr */

    .text
    .code32
    .globl mb_entry
/* Multiboot hands over in 32-bit protected mode, paging off: EAX = 0x2BADB002, EBX = the
 * multiboot info. */
mb_entry:
    cli
    cld
    mov $loader_stack_top, %esp
    push %ebx
    push %eax
    call loader_main          /* returns only when the guest is loaded and the ABI set up */
    add $8, %esp

    /* CR4 = PAE | OSFXSR | OSXMMEXCPT, CR3 = the identity map, EFER = SCE | LME (| NXE),
     * then CR0 = PG | AM | WP | NE | ET | MP | PE: the ABI's control registers. */
    mov $0x620, %eax
    mov %eax, %cr4
    mov $0x10000, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    mov efer_value, %eax
    xor %edx, %edx
    wrmsr
    lgdt abi_gdtr             /* the GDT loader_main wrote at 0x1000 */
    lidt null_idtr            /* the ABI starts with no IDT */
    mov $0x80050033, %eax
    mov %eax, %cr0
    ljmp $0x08, $long_mode

    .code64
long_mode:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $0xA0000, %esp        /* vCPU 0's boot stack */
    pushq $0x2
    popfq                     /* RFLAGS = 0x2 */
    pushq guest_entry
    mov $0x2000, %edi         /* RDI = boot info */
    xor %esi, %esi            /* RSI = vCPU index 0 */
    xor %eax, %eax
    xor %ebx, %ebx
    xor %ecx, %ecx
    xor %edx, %edx
    xor %ebp, %ebp
    xor %r8d, %r8d
    xor %r9d, %r9d
    xor %r10d, %r10d
    xor %r11d, %r11d
    xor %r12d, %r12d
    xor %r13d, %r13d
    xor %r14d, %r14d
    xor %r15d, %r15d
    ret                       /* to the ELF entry, RSP back at 0xA0000 */

    .section .rodata
    .balign 8
abi_gdtr:
    .word 23                  /* null, 0x08 code64, 0x10 data */
    .long 0x1000
    .balign 8
null_idtr:
    .word 0
    .long 0

    .balign 16
    .globl guest_elf, guest_elf_end
guest_elf:
    .incbin GUEST_ELF
guest_elf_end:

    .bss
    .balign 16
    .space 16384
loader_stack_top:
