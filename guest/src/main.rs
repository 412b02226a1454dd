//! The nmifuzz guest kernel: a tiny ring-0 x86-64 kernel whose NMI entry is under test.
//!
//! The host VMM boots it once, snapshots it at the READY report and then, for every fuzz input,
//! restores the snapshot, writes a script (which NMI entry variant, which workload, what each
//! `do_nmi` call does) and lets it run from the instruction after READY while injecting NMIs.
//! The contract with the host is the `nmifuzz-abi` crate; `README.md` describes the interface.
//!
//! Everything here runs emulated, one instruction at a time (~0.56 µs each on the kvm_pvm host),
//! so the code that runs per input is kept short, and it never uses SSE, x87 or `popcnt`, which
//! that host cannot emulate at ring 0.
#![no_std]
#![no_main]

mod console;
mod cpu;
mod exceptions;
mod gdt;
mod idt;
mod invariant;
mod mailbox;
mod nmi;
mod paging;
mod panic;
mod percpu;
mod regs;
mod scribble;
mod script;
mod stacks;
mod tss;
mod user;
mod workload;

use core::arch::global_asm;

use nmifuzz_abi::ABI_VERSION;

use crate::console::kprintln;

// The ELF entry point. The VMM enters here in 64-bit mode with flat CS/DS/SS, an empty IDT and
// no usable stack, so the first thing is a stack of our own; `kmain` does the rest.
global_asm!(
    r#"
    .pushsection .text.entry, "ax"
    .global _start
    .type _start, @function
_start:
    cld                                 /* the SysV ABI wants DF clear at every call */
    lea rsp, [rip + boot_stack_top]     /* 16-byte aligned: RSP is 8 mod 16 in kmain, as */
    call kmain                          /* after any call */
2:  hlt                                 /* kmain never returns */
    jmp 2b
    .size _start, . - _start
    .popsection

    .pushsection .stack.boot, "aw", @nobits
    .balign 4096
    .global boot_stack_bottom
    .type boot_stack_bottom, @object
boot_stack_bottom:
    .skip 64 * 1024
    .global boot_stack_top
    .type boot_stack_top, @object
boot_stack_top:
    .popsection
"#
);

/// Boots to READY, then runs one input: read the script, check its NMI entry is installed, run
/// its workload, check the NMI invariants that can only be checked at the end, report DONE.
#[unsafe(no_mangle)]
extern "C" fn kmain() -> ! {
    gdt::init();
    percpu::init(); // after gdt::init: its segment reloads clear the GS base
    user::init();
    idt::init();
    paging::init();
    mailbox::init();
    kprintln!("nmifuzz guest: booted, abi v{ABI_VERSION}");
    mailbox::ready();

    // Every run starts here, with the script the host has just written, and with the page
    // tables the host has just restored behind our back: drop the previous run's TLB entries.
    paging::flush_tlb();
    let run = script::read();
    nmi::check_installed(run.variant);
    workload::run(&run);
    nmi::check_done();
    mailbox::done()
}
