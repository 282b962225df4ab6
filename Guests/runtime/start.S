/* Entry from the VMM (docs/guest-abi.md): long mode, CPL0, RDI = boot info, RSI = vCPU
 * index, RSP = this vCPU's boot stack. */
    .section .text.start, "ax"
    .globl _start
_start:
    outb %al, $0xF5        /* first act: the boot marker (docs/guest-abi.md) */
    and $-16, %rsp
    call sv_runtime_start
1:  cli
    hlt
    jmp 1b

/* void sv_enter_user(void (*fn)(void *), void *arg, uint64_t user_rsp, uint64_t *saved_rsp)
 * Saves the kernel's callee-saved registers and RSP in *saved_rsp (where TSS.RSP0 points),
 * then IRETQs to CPL3 with IOPL=3. The user side calls fn(arg) and comes back with `int3`
 * through a DPL3 gate. (Not `syscall` or `int $0x80`: on this host's nested KVM the first
 * leaves the vCPU at CPL3 and the second is ignored; exceptions are delivered properly.) */
    .text
    .globl sv_enter_user
sv_enter_user:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, (%rcx)
    pushq $0x1b            /* SS: user data, RPL3 */
    push %rdx              /* RSP */
    pushq $0x3002          /* RFLAGS: IOPL=3, IF=0 */
    pushq $0x23            /* CS: user code, RPL3 */
    lea user_trampoline(%rip), %rax
    push %rax
    iretq

user_trampoline:
    mov %rdi, %rax
    mov %rsi, %rdi
    call *%rax
    int3
    ud2

/* Vector 3 from CPL3: back to the kernel. The CPU switched to TSS.RSP0, which points at
 * the saved-RSP slot; the 5-word interrupt frame sits just below it. */
    .globl sv_user_return_isr
sv_user_return_isr:
    mov 40(%rsp), %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret

/* Exception stubs: push a zero where the CPU pushes no error code, then the vector. */
.macro EXC_NOERR n
    .globl sv_exc\n
sv_exc\n:
    pushq $0
    pushq $\n
    jmp exception_common
.endm
.macro EXC_ERR n
    .globl sv_exc\n
sv_exc\n:
    pushq $\n
    jmp exception_common
.endm
EXC_NOERR 0
EXC_NOERR 1
EXC_NOERR 2
EXC_NOERR 3
EXC_NOERR 4
EXC_NOERR 5
EXC_NOERR 6
EXC_NOERR 7
EXC_ERR 8
EXC_NOERR 9
EXC_ERR 10
EXC_ERR 11
EXC_ERR 12
EXC_ERR 13
EXC_ERR 14
EXC_NOERR 15
EXC_NOERR 16
EXC_ERR 17
EXC_NOERR 18
EXC_NOERR 19
EXC_NOERR 20
EXC_ERR 21
EXC_NOERR 22
EXC_NOERR 23
EXC_NOERR 24
EXC_NOERR 25
EXC_NOERR 26
EXC_NOERR 27
EXC_NOERR 28
EXC_ERR 29
EXC_ERR 30
EXC_NOERR 31

.macro IRQ n
sv_irq\n:
    pushq $\n
    jmp irq_common
.endm
.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
IRQ \n
.endr

/* Device interrupts: irq n arrives as vector 0x20+n (docs/guest-abi.md). Saves what a C
 * call may clobber, calls sv_irq_dispatch(n) on an aligned stack, returns with iretq. */
irq_common:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    push %rbp
    mov %rsp, %rbp
    mov 80(%rsp), %rdi     /* the irq number pushed by the stub */
    and $-16, %rsp
    cld
    call sv_irq_dispatch
    mov %rbp, %rsp
    pop %rbp
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    add $8, %rsp
    iretq

exception_common:
    mov %rsp, %rdi         /* -> struct sv_exception_frame */
    and $-16, %rsp
    call sv_exception
1:  cli
    hlt
    jmp 1b

    .section .rodata
    .globl sv_exception_stubs
    .balign 8
sv_exception_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad sv_exc\n
    .endr
    .globl sv_irq_stubs
sv_irq_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    .quad sv_irq\n
    .endr
