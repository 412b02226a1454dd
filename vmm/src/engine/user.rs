//! Ring 3: how the engine moves the guest through user mode, where it never single-steps.
//!
//! On kvm_pvm ring-3 code runs natively: single-stepping it leaks #DB into the guest, and
//! hardware breakpoints at CPL3 addresses never fire (kvm-on-this-host.md section 9). So
//! wherever the engine would step into or through ring 3, in either mode, it makes an
//! *excursion* instead: a free run with hardware breakpoints on the ring-0 code that ring 3 can
//! enter, which ends at the first of
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

use super::run::Run;
use super::trace::Event;
use super::{Engine, GuestFacts};
use crate::vm::{IretFrame, Vm};

/// RFLAGS.TF.
const RFLAGS_TF: u64 = 1 << 8;
/// A selector's table indicator: set for the LDT.
const SELECTOR_TI: u64 = 1 << 2;
/// A segment descriptor's present bit (SDM Vol. 3A §3.4.5).
const DESCRIPTOR_PRESENT: u64 = 1 << 47;

/// What an excursion's breakpoint `index` (DR0-DR3) stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum UserEntry {
    /// An exception entry: `vector`'s stub.
    Exception { vector: u8 },
    /// The run's NMI entry.
    Nmi,
    /// The SYSCALL entry (LSTAR).
    Syscall,
}

/// What an excursion's DR0 to DR3 watch, in that order.
const EXCURSION_ENTRIES: [UserEntry; 4] = [
    UserEntry::Exception { vector: super::WATCHED_VECTORS[UD_INDEX] },
    UserEntry::Exception { vector: super::WATCHED_VECTORS[PF_INDEX] },
    UserEntry::Nmi,
    UserEntry::Syscall,
];

/// The breakpoints of an excursion, DR0 to DR3 ([`EXCURSION_ENTRIES`]).
pub(super) fn excursion_breakpoints(
    facts: &GuestFacts,
    nmi_entry: Option<u64>,
) -> [Option<u64>; 4] {
    EXCURSION_ENTRIES.map(|entry| match entry {
        UserEntry::Exception { vector } => super::WATCHED_VECTORS
            .iter()
            .position(|&v| v == vector)
            .map(|i| facts.exception_entries[i]),
        UserEntry::Nmi => nmi_entry,
        UserEntry::Syscall => facts.syscall_entry,
    })
}

/// Which of [`EXCURSION_ENTRIES`] DR`index` (0 to 3) is.
pub(super) fn user_entry(index: usize) -> UserEntry {
    EXCURSION_ENTRIES[index]
}

/// Positions of #UD and #PF in [`super::WATCHED_VECTORS`].
const UD_INDEX: usize = 1;
const PF_INDEX: usize = 2;
const _: () =
    assert!(super::WATCHED_VECTORS[UD_INDEX] == 6 && super::WATCHED_VECTORS[PF_INDEX] == 14);

/// The guest's current privilege level.
pub(super) fn cpl(vm: &mut Vm) -> u8 {
    (vm.sync_state().sregs.cs.selector & 3) as u8
}

/// Whether an IRETQ popping `frame` returns to ring 3.
pub(super) fn returns_to_user(frame: &IretFrame) -> bool {
    frame.cs & 3 == 3
}

/// Whether an IRETQ to ring 3 popping `frame` faults at CPL0 instead of returning: its CS or
/// SS selector is in the LDT (which this host refuses with #GP; the guest's user segments are
/// all in the GDT) or names a descriptor outside the GDT or not present. The engine steps such
/// an IRETQ as any faulting instruction, so the fault's handler is counted as ring-0 code.
fn return_faults(vm: &mut Vm, frame: &IretFrame) -> bool {
    let gdt = vm.sync_state().sregs.gdt;
    let present = |selector: u64| {
        let offset = selector & !7;
        if selector & SELECTOR_TI != 0 || offset + 7 > u64::from(gdt.limit) {
            return false;
        }
        vm.ram().read_u64(gdt.base + offset).is_ok_and(|d| d & DESCRIPTOR_PRESENT != 0)
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
        if return_faults(vm, frame) {
            return;
        }
        if frame.rflags & RFLAGS_TF != 0 {
            let slot = vm.sync_state().regs.rsp + 16;
            // The frame was just read from guest memory, so the write cannot fail.
            let _ = vm.ram_mut().write_u64(slot, frame.rflags & !RFLAGS_TF);
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
