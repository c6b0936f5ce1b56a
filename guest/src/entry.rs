//! The ring-0 part of the test guest, in assembly: on KVM hosts without VT-x (PVM) every
//! ring-0 instruction is emulated, slowly and with gaps (no SSE, no xsave), so this part does
//! the minimum and every vCPU drops to ring 3, where the Rust code runs at native speed.
//!
//! Per-vCPU area (PERCPU_SIZE bytes at `__image_end + cpu * PERCPU_SIZE`):
//!   0x0000  TSS: RSP0, I/O bitmap base 0x68, 8 KiB bitmap of zeros (all ports allowed to
//!           ring 3), a terminating 0xff byte
//!   0x2100  CPUID as ring 0 saw it (see `CPUID_SAVE`)
//!   0x3000  top of the ring-0 stack (used only for the iretq frame)
//!   0xc000  top of the ring-3 stack
//! GDT: 0x08 kernel code64, 0x10 kernel data, 0x18 user code32, 0x20 user data, 0x28 user
//! code64, then a 16-byte TSS descriptor per vCPU from 0x30.

/// Bytes of memory per vCPU for its TSS and stacks.
pub const PERCPU_SIZE: u64 = 0xc000;
/// Highest number of vCPUs the guest can run on (xAPIC IDs).
pub const MAX_CPUS: usize = 255;
/// Offset in the per-vCPU area of the CPUID values the ring-0 entry recorded: leaf 0x1 EBX,
/// ECX; leaf 0xB ECX, EDX; leaf 0x40000000 EBX, ECX, EDX. Recorded in ring 0 because on PVM
/// hosts CPUID executed in ring 3 is not intercepted and reports the host's CPU, while in
/// ring 0 it is emulated and answers from the table the VMM set.
pub const CPUID_SAVE: u64 = 0x2100;
/// Where the AP start-up code is copied (a SIPI vector of 8).
pub const TRAMPOLINE_BASE: u64 = 0x8000;

core::arch::global_asm!(
    r#"
    .set PERCPU_SIZE, 0xc000
    .set RING0_STACK_TOP, 0x3000
    .set CPUID_SAVE, 0x2100
    .set RING3_STACK_TOP, 0xc000
    .set TRAMP_BASE, 0x8000

    .section .text.entry, "ax"
    .code64
    .global _start
_start:
    cli
    mov %rsi, %r15
    lgdt gdt_ptr(%rip)
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    lea pml4(%rip), %rax
    mov %rax, %cr3
    mov $0x620, %eax
    mov %rax, %cr4
    mov $0x80050033, %eax
    mov %rax, %cr0
    jmp cpu_setup

    .global ap_entry64
ap_entry64:
    lgdt gdt_ptr(%rip)
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %r15d, %r15d

cpu_setup:
    mov $1, %eax
    cpuid
    mov %ebx, %r12d
    mov %ecx, %r11d
    shr $24, %ebx
    mov %rbx, %r14
    mov %r14, %rax
    imul $PERCPU_SIZE, %rax
    add percpu_base(%rip), %rax
    mov %rax, %r13
    mov %r12d, CPUID_SAVE(%r13)
    mov %r11d, (CPUID_SAVE + 4)(%r13)
    mov $0xb, %eax
    xor %ecx, %ecx
    cpuid
    mov %ecx, (CPUID_SAVE + 8)(%r13)
    mov %edx, (CPUID_SAVE + 12)(%r13)
    mov $0x40000000, %eax
    cpuid
    mov %ebx, (CPUID_SAVE + 16)(%r13)
    mov %ecx, (CPUID_SAVE + 20)(%r13)
    mov %edx, (CPUID_SAVE + 24)(%r13)
    lea RING0_STACK_TOP(%r13), %rsp
    lea 2f(%rip), %rax
    pushq $0x08
    push %rax
    lretq
2:
    mov %rsp, 4(%r13)
    movw $0x68, 0x66(%r13)
    movb $0xff, 0x2068(%r13)
    mov %r14, %rdi
    shl $4, %rdi
    lea gdt_tss(%rip), %rcx
    add %rcx, %rdi
    mov %r13d, %ecx
    and $0xffffff, %ecx
    shl $16, %rcx
    mov %r13, %rdx
    shr $24, %rdx
    movzbl %dl, %edx
    shl $56, %rdx
    or %rdx, %rcx
    movabs $0x0000890000002068, %rdx
    or %rdx, %rcx
    mov %rcx, (%rdi)
    mov %r13, %rdx
    shr $32, %rdx
    mov %rdx, 8(%rdi)
    mov %r14d, %eax
    shl $4, %eax
    add $0x30, %eax
    ltr %ax
    mov $0x23, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %fs
    mov %eax, %gs
    lea (RING3_STACK_TOP - 8)(%r13), %rcx
    pushq $0x23
    push %rcx
    pushq $0x2
    pushq $0x2b
    lea guest_main(%rip), %rax
    push %rax
    mov %r14, %rdi
    mov %r15, %rsi
    iretq

    .code16
    .global ap_trampoline_start
ap_trampoline_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (tramp_gdt_ptr - ap_trampoline_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $(TRAMP_BASE + tramp_pm32 - ap_trampoline_start)
    .code32
tramp_pm32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x620, %eax
    mov %eax, %cr4
    mov (TRAMP_BASE + tramp_cr3 - ap_trampoline_start), %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov $0x80050033, %eax
    mov %eax, %cr0
    ljmpl $0x18, $(TRAMP_BASE + tramp_lm64 - ap_trampoline_start)
    .code64
tramp_lm64:
    movabs $ap_entry64, %rax
    jmp *%rax
    .balign 8
tramp_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00af9a000000ffff
tramp_gdt_ptr:
    .word 31
    .long TRAMP_BASE + tramp_gdt - ap_trampoline_start
tramp_cr3:
    .long pml4
    .global ap_trampoline_end
ap_trampoline_end:

    .section .data.boot, "aw"
    .balign 16
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
    .balign 8
percpu_base:
    .quad __image_end
    .balign 16
    .global gdt
gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cffa000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x00affa000000ffff
gdt_tss:
    .fill 2 * 255, 8, 0
gdt_end:

    .section .data.pagetables, "aw"
    .balign 4096
    .global pml4
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
    .balign 4096
    .global pdpt
pdpt:
    .quad pd_low + 0x7
    .quad pd_low + 0x1000 + 0x7
    .quad pd_low + 0x2000 + 0x7
    .quad pd_low + 0x3000 + 0x7
    .fill 508, 8, 0
    .balign 4096
pd_low:
    .set pde_index, 0
    .rept 2048
    .quad (pde_index << 21) + 0x87
    .set pde_index, pde_index + 1
    .endr
    .text
"#,
    options(att_syntax)
);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static pdpt: u8;
    static __image_end: u8;
}

/// The AP start-up code, to be copied to `TRAMPOLINE_BASE`.
pub fn trampoline() -> &'static [u8] {
    // SAFETY: both symbols are labels in the same section of this image, start before end,
    // and the bytes between them are immutable code.
    unsafe {
        let start = core::ptr::addr_of!(ap_trampoline_start);
        let end = core::ptr::addr_of!(ap_trampoline_end);
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// The page-directory-pointer table (identity map; entries 0..4 cover the first 4 GiB).
pub fn pdpt_address() -> u64 {
    core::ptr::addr_of!(pdpt) as u64
}

/// First byte after the image: the per-vCPU areas start here.
pub fn image_end() -> u64 {
    core::ptr::addr_of!(__image_end) as u64
}
