//! Ring 3: how the engine moves the guest through user mode, where it never single-steps.
//!
//! On kvm_pvm ring-3 code runs natively: single-stepping it leaks #DB into the guest, and
//! hardware breakpoints at CPL3 addresses never fire (kvm-on-this-host.md section 9). So
//! wherever the engine would step into or through ring 3, in either mode, it makes an
//! *excursion* instead: a free run with hardware breakpoints on the ring-0 code that ring 3 can
//! enter ([`super::watch::Watches::excursion`]), which ends at the first of
//!
//! - such a breakpoint, the stop before that code's first instruction: the #UD entry (the user
//!   workload's system call is a `ud2` on this host), the #PF entry, the run's NMI entry (an NMI
//!   made at a ring-3 point, or latched at the IRETQ to user, arrives there), and the SYSCALL
//!   entry (hosts where SYSCALL from CPL3 enters CPL0);
//! - a *ring-3 point*: the user's one-byte write to
//!   [`USER_POINT_ADDRESS`](nmifuzz_abi::USER_POINT_ADDRESS), where no memory is: its MMIO exit
//!   is the boundary after it (RIP is past the write). (An `out` would not do: kvm_pvm runs
//!   ring 3 with IOPL 0, so `out` from ring 3 raises #GP.)
//! - any other exit (a report, an unexpected fault, the watchdog), handled as in any free run.
//!
//! An excursion starts at a stop before an IRETQ or `sysretq` that goes to CPL3 (neither can be
//! stepped: the step would run the first user instruction with TF set), unless the IRETQ will
//! fault at CPL0 (a not-present or LDT selector, see [`return_faults`]), and at a stop at CPL3
//! whenever the mode wants stepping.
//!
//! **The counting rule with ring 3.** Ring-3 instructions are not counted, except that a ring-3
//! point retires one instruction (its write), so that consecutive points are distinct
//! boundaries; the IRETQ or `sysretq` into ring 3 retires one; the breakpoint stop that ends an
//! excursion retires nothing, as every handler-entry breakpoint stop. The same rule holds on
//! every host, so a schedule means the same everywhere.

use super::Engine;
use super::run::Run;
use super::trace::Event;
use crate::vm::{IretFrame, Vm};

/// RFLAGS.TF.
const RFLAGS_TF: u64 = 1 << 8;
/// A selector's table indicator: set for the LDT.
const SELECTOR_TI: u64 = 1 << 2;
/// A segment descriptor's present bit (SDM Vol. 3A §3.4.5).
const DESCRIPTOR_PRESENT: u64 = 1 << 47;

/// The guest's current privilege level.
pub(super) fn cpl(vm: &mut Vm) -> u8 {
    (vm.sync_state().sregs.cs.selector & 3) as u8
}

/// Whether an IRETQ popping `frame` returns to ring 3.
pub(super) fn returns_to_user(frame: &IretFrame) -> bool {
    frame.cs & 3 == 3
}

/// Whether an IRETQ to ring 3 popping `frame` faults at CPL0 instead of returning: its CS or
/// SS selector names a descriptor outside its table or not present, or one in the LDT on a host
/// that refuses LDT selectors there (`ldt_stacks` false: kvm_pvm raises #GP). The engine steps
/// such an IRETQ as any faulting instruction, so the fault's handler is counted as ring-0 code.
fn return_faults(vm: &mut Vm, frame: &IretFrame, ldt_stacks: bool) -> bool {
    let sregs = vm.sync_state().sregs;
    let present = |selector: u64| {
        let (base, limit) = if selector & SELECTOR_TI == 0 {
            (sregs.gdt.base, u64::from(sregs.gdt.limit))
        } else if ldt_stacks && sregs.ldt.present != 0 {
            (sregs.ldt.base, u64::from(sregs.ldt.limit))
        } else {
            return false;
        };
        let offset = selector & !7;
        offset + 7 <= limit
            && vm.read_virtual_u64(base + offset).is_ok_and(|d| d & DESCRIPTOR_PRESENT != 0)
    };
    !present(frame.cs) || !present(frame.ss)
}

impl Engine {
    /// At a stop before an IRETQ that returns to ring 3 by popping `frame`, judged legal: it
    /// closes the contexts it returns to, even if it faults. (A faulting return to user is the
    /// kernel's to handle: Linux turns it into a fault of the user context, as if the return
    /// had happened, and delivers a signal; the NMI that returned is done.) One that will not
    /// fault retires, and an excursion runs it: a frame pushed while the engine stepped holds
    /// the stepping TF, which must not reach ring 3. One that will fault is stepped.
    pub(super) fn iretq_to_user(&mut self, vm: &mut Vm, run: &mut Run<'_>, frame: &IretFrame) {
        run.books.resume(frame.rip, frame.rsp);
        if return_faults(vm, frame, self.profile.ldt_ss16) {
            run.faulting_return = true;
            return;
        }
        if frame.rflags & RFLAGS_TF != 0 {
            let slot = vm.sync_state().regs.rsp + 16;
            // The frame was just read from guest memory, so the write cannot fail.
            let _ = vm.write_virtual_u64(slot, frame.rflags & !RFLAGS_TF);
        }
        run.recorder.event(Event::Iretq { target: frame.rip, emulated: false });
        self.start_excursion(run);
    }

    /// At a stop before a `sysretq`: it retires, and an excursion runs it. R11, the RFLAGS it
    /// loads, loses a stepping TF.
    pub(super) fn sysretq_to_user(&mut self, vm: &mut Vm, run: &mut Run<'_>) {
        let regs = vm.sync_state().regs;
        if regs.r11 & RFLAGS_TF != 0 {
            vm.set_r11(regs.r11 & !RFLAGS_TF);
        }
        run.recorder.event(Event::Sysretq { target: regs.rcx });
        self.start_excursion(run);
    }

    /// The return to ring 3 at this stop retires; the guest runs it in an excursion.
    fn start_excursion(&mut self, run: &mut Run<'_>) {
        run.retire(1);
        run.stepping = false;
        run.excursion = true;
    }
}
