//! The VM: one vCPU running the guest kernel, booted to READY, snapshotted there, and run
//! again and again from that snapshot.

mod debug;
mod mailbox;
mod perform;
mod ready;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sync_regs};
use kvm_ioctls::{Kvm, SyncReg, VcpuFd, VmFd};
use nmifuzz_abi::{
    ABI_VERSION, MAILBOX_MAGIC, MAILBOX_SYMBOL, SCRIPT_SYMBOL, Script, USER_POINT_ADDRESS, Variant,
    port,
};
use zerocopy::IntoBytes;

pub use self::debug::GuestDebug;
pub use self::perform::IretFrame;
use self::ready::{boot_to_ready, finish_instruction, flush_pending_io};
use crate::boot;
use crate::error::{Error, Result};
use crate::exit::{self, Exit};
use crate::gate;
use crate::image::GuestImage;
use crate::kvm::{self, KVM_DEVICE};
use crate::layout::{DEFAULT_MEMORY, LARGE_PAGE, MAX_MEMORY};
use crate::memory::GuestRam;
use crate::outcome::{Outcome, Verdict};
use crate::snapshot::Snapshot;
use crate::watchdog::Watchdog;

/// Most console bytes kept per run; a guest that prints without end cannot exhaust host memory.
const CONSOLE_LIMIT: usize = 64 << 10;

/// The NMI vector.
const NMI_VECTOR: u64 = 2;
/// RFLAGS.TF, the trap flag single-stepping uses.
const RFLAGS_TF: u64 = 1 << 8;
/// How to build a [`Vm`].
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The KVM device.
    pub kvm_device: PathBuf,
    /// Guest memory in bytes: a multiple of 2 MiB, from 4 MiB to 1 GiB.
    pub memory: u64,
    /// Wall-clock limit for booting to READY.
    pub boot_timeout: Duration,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            kvm_device: KVM_DEVICE.into(),
            memory: DEFAULT_MEMORY,
            boot_timeout: Duration::from_secs(10),
        }
    }
}

/// Limits of one run; exceeding either ends the run with a verdict.
#[derive(Clone, Copy, Debug)]
pub struct RunLimits {
    /// Wall-clock limit, enforced by the watchdog even if the guest never exits.
    pub wall: Duration,
    /// Most KVM_RUN round trips (exits, including single-steps).
    pub max_exits: u64,
}

impl Default for RunLimits {
    fn default() -> Self {
        Self { wall: Duration::from_secs(2), max_exits: 1_000_000 }
    }
}

/// The guest VM.
pub struct Vm {
    // Declaration order is drop order: the vCPU and VM fds go before the memory they map.
    vcpu: VcpuFd,
    vm: VmFd,
    _kvm: Kvm,
    ram: GuestRam,
    image: GuestImage,
    snapshot: Snapshot,
    watchdog: Watchdog,
    script_address: u64,
    mailbox_address: u64,
    console: Vec<u8>,
    /// The snapshot's vCPU state waits in the sync-regs area for the next KVM_RUN.
    reset_pending: bool,
    /// The last exit left an instruction for KVM to finish at the next entry (an `in`, a read
    /// of memory with nothing behind it): see [`finish_instruction`].
    unfinished: bool,
    /// What KVM_SET_GUEST_DEBUG was last given.
    debug: GuestDebug,
    /// Whether single-stepping is the guest's own TF, which the VMM sets again after every
    /// register write (see [`Vm::set_step_rearm`]).
    rearm_steps: bool,
    /// Wall-clock time spent inside KVM_RUN by [`Vm::run_once`], for overhead measurements.
    kvm_run_time: Duration,
    /// The stack segments the guest was seen with at IRETQ stops (the kernel's at READY, the
    /// null SS an exception from ring 3 leaves), so that an emulated IRETQ can load the one
    /// its frame names ([`Vm::iretq_keeps_segments`]).
    stack_segments: Vec<kvm_segment>,
}

impl Vm {
    /// Creates the VM, loads `elf`, boots it to READY and takes the snapshot there.
    pub fn new(config: &VmConfig, elf: Vec<u8>) -> Result<Self> {
        if !config.memory.is_multiple_of(LARGE_PAGE)
            || !(4 << 20..=MAX_MEMORY).contains(&config.memory)
        {
            return Err(Error::MemorySize(config.memory));
        }
        let image = GuestImage::parse(elf, config.memory)?;
        let script_address = image.symbol(SCRIPT_SYMBOL)?;
        let mailbox_address = image.symbol(MAILBOX_SYMBOL)?;

        let kvm = kvm::open(&config.kvm_device)?;
        let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        // Only Intel VMX needs this (real-mode TSS), but it is harmless elsewhere; the address is
        // Firecracker's, above any guest memory nmifuzz supports.
        vm.set_tss_address(0xfffb_d000).map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
        let mut ram = GuestRam::new(&vm, config.memory)?;
        boot::write_boot_tables(&mut ram)?;
        image.load(&mut ram)?;

        let mut vcpu = vm.create_vcpu(0).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        boot::setup_vcpu(&kvm, &vcpu, image.entry())?;
        for reg in [SyncReg::Register, SyncReg::SystemRegister, SyncReg::VcpuEvents] {
            vcpu.set_sync_valid_reg(reg);
        }

        let watchdog = Watchdog::new()?;
        let mut console = Vec::new();
        boot_to_ready(&mut vcpu, &watchdog, &image, &mut console, config.boot_timeout)?;
        flush_pending_io(&mut vcpu)?;

        let snapshot = Snapshot::take(&vm, &vcpu, &mut ram)?;
        let stack_segments = vec![snapshot.sregs.ss];
        let vm = Self {
            vcpu,
            vm,
            _kvm: kvm,
            ram,
            image,
            snapshot,
            watchdog,
            script_address,
            mailbox_address,
            console,
            reset_pending: false,
            unfinished: false,
            debug: GuestDebug::default(),
            rearm_steps: false,
            kvm_run_time: Duration::ZERO,
            stack_segments,
        };
        let mailbox = vm.mailbox()?;
        if mailbox.magic != MAILBOX_MAGIC || mailbox.version != ABI_VERSION {
            return Err(Error::AbiMismatch { found: mailbox.version, expected: ABI_VERSION });
        }
        Ok(vm)
    }

    /// The guest image and its symbols.
    pub fn image(&self) -> &GuestImage {
        &self.image
    }

    /// Guest memory.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Guest memory, for writing; host writes are restored by the next reset.
    pub fn ram_mut(&mut self) -> &mut GuestRam {
        &mut self.ram
    }

    /// Reads the qword at guest virtual address `address`, through the page tables the vCPU
    /// uses now (its CR3 as of the last exit).
    pub fn read_virtual_u64(&self, address: u64) -> Result<u64> {
        self.ram.read_u64(self.physical(address)?)
    }

    /// Writes the qword at guest virtual address `address`, as [`Vm::read_virtual_u64`] reads.
    pub fn write_virtual_u64(&mut self, address: u64, value: u64) -> Result<()> {
        let physical = self.physical(address)?;
        self.ram.write_u64(physical, value)
    }

    /// Where the qword at virtual `address` lies in guest memory: mapped, and within one page.
    fn physical(&self, address: u64) -> Result<u64> {
        let cr3 = self.vcpu.sync_regs().sregs.cr3;
        let unmapped = || Error::Memory(format!("{address:#x} is not mapped (CR3 {cr3:#x})"));
        let page_end = (address | 0xfff).checked_add(1).ok_or_else(unmapped)?;
        if address + 8 > page_end {
            return Err(Error::Memory(format!("the qword at {address:#x} spans two pages")));
        }
        self.ram.translate(cr3, address).ok_or_else(unmapped)
    }

    /// The snapshot taken at READY.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Restores guest memory and vCPU state to the snapshot. Returns the number of pages
    /// copied back.
    pub fn reset(&mut self) -> Result<usize> {
        self.console.clear();
        // Finished now, its write-back lands on the old run's registers and its memory writes
        // in the dirty log; finished at the next KVM_RUN, it would clobber the snapshot's RIP.
        if std::mem::take(&mut self.unfinished) {
            finish_instruction(&mut self.vcpu)?;
        }
        let pages = self.snapshot.restore(&self.vm, &mut self.vcpu, &mut self.ram)?;
        self.reset_pending = true;
        Ok(pages)
    }

    /// Makes a pending reset take effect now instead of at the next run, so that vCPU ioctls
    /// see the restored state (KVM applies sync registers at the start of KVM_RUN).
    pub fn apply_pending_reset(&mut self) -> Result<()> {
        if self.reset_pending {
            self.keep_step_flag();
            flush_pending_io(&mut self.vcpu)?;
            self.reset_pending = false;
        }
        Ok(())
    }

    /// The vCPU, for ioctls the VM does not wrap.
    pub fn vcpu(&self) -> &VcpuFd {
        &self.vcpu
    }

    /// The general registers as of the last exit (from the sync-regs area; no ioctl).
    pub fn regs(&self) -> kvm_regs {
        self.vcpu.sync_regs().regs
    }

    /// Registers, system registers and events as of the last exit, plus any change queued for
    /// the next KVM_RUN, without copying them.
    pub fn sync_state(&mut self) -> &kvm_sync_regs {
        self.vcpu.sync_regs_mut()
    }

    /// Total wall-clock time spent inside KVM_RUN so far; the rest of a run's time is the
    /// VMM's own overhead.
    pub fn kvm_run_time(&self) -> Duration {
        self.kvm_run_time
    }

    /// The watchdog, for callers that drive [`Vm::run_once`] themselves.
    pub fn watchdog(&self) -> &Watchdog {
        &self.watchdog
    }

    /// Says whether single-stepping on this host is the guest's own TF (stock KVM; see
    /// `HostProfile::sticky_single_step`). KVM sets TF once, at KVM_SET_GUEST_DEBUG, for the
    /// RIP of that moment; a register write at another RIP (the reset, anything the VMM
    /// performs), an RFLAGS load of the guest's (`popfq`, `iretq`), every instruction KVM
    /// emulates (its write-back sets RFLAGS again: `mov` to or from a debug register, port and
    /// MMIO accesses) and every event delivery clear it. So on such a host every entry while
    /// single-stepping writes the registers back, as KVM reported them at the last exit, with TF.
    pub fn set_step_rearm(&mut self, on: bool) {
        self.rearm_steps = on;
    }

    /// Before an entry: see [`Vm::set_step_rearm`]. KVM hides its own TF from the registers it
    /// reports, so the VMM's copy never has it otherwise.
    fn keep_step_flag(&mut self) {
        if self.rearm_steps && self.debug.single_step {
            self.vcpu.sync_regs_mut().regs.rflags |= RFLAGS_TF;
            self.vcpu.set_sync_dirty_reg(SyncReg::Register);
        }
    }

    /// Makes an NMI pending (KVM_NMI).
    ///
    /// Right after a reset the sync-regs area carries the snapshot's events with
    /// KVM_VCPUEVENT_VALID_NMI_PENDING; KVM applies them on entry, after a KVM_NMI, and would
    /// silently cancel it. Then the NMI is added to those events instead.
    pub fn inject_nmi(&mut self) -> Result<()> {
        if self.reset_pending {
            let events = &mut self.vcpu.sync_regs_mut().events;
            events.nmi.pending = events.nmi.pending.saturating_add(1);
            Ok(())
        } else {
            self.vcpu.nmi().map_err(Error::kvm("KVM_NMI"))
        }
    }

    /// Writes the script the guest reads after READY, and points IDT vector 2 at the script's
    /// NMI entry variant (a script with an unknown variant is written as it is: the guest
    /// refuses it with a panic that names the field).
    pub fn write_script(&mut self, script: &Script) -> Result<()> {
        self.ram.write(self.script_address, script.as_bytes())?;
        match Variant::from_code(script.variant) {
            Some(variant) => self.install_nmi_entry(self.image.symbol(variant.entry_symbol())?),
            None => Ok(()),
        }
    }

    /// Points the guest's NMI gate at `entry`, keeping its selector, IST and type.
    fn install_nmi_entry(&mut self, entry: u64) -> Result<()> {
        let gate = gate::gate_address(self.snapshot.sregs.idt.base, NMI_VECTOR);
        let (low, high) = gate::with_target(self.ram.read_u64(gate)?, entry);
        self.ram.write_u64(gate, low)?;
        self.ram.write_u64(gate + 8, high)
    }

    /// Console output of the current run so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.console).into_owned()
    }

    /// Runs the guest once and returns the exit, handling what belongs to the VMM itself:
    /// console bytes are collected, and on hosts that cannot run a ring-0 `int3` it is
    /// emulated (RIP advanced past it, #BP injected), as hardware would have done it.
    pub fn run_once(&mut self) -> Result<Exit> {
        self.keep_step_flag();
        let start = Instant::now();
        let exit = exit::run(&mut self.vcpu);
        self.kvm_run_time += start.elapsed();
        let exit = exit?;
        self.reset_pending = false;
        // An `out` needs no finishing: KVM's emulator completes it before the exit, and stock
        // KVM's fast path skips it at the next entry only if RIP is still at it.
        self.unfinished = matches!(exit, Exit::IoIn { .. } | Exit::Mmio { .. });
        match exit {
            Exit::IoOut { port: port::CONSOLE, value, .. }
                if self.console.len() < CONSOLE_LIMIT =>
            {
                self.console.push(value as u8);
            }
            Exit::EmulationFailure { ref bytes } if bytes.first() == Some(&perform::INT3) => {
                self.inject_breakpoint();
                return Ok(Exit::Int3Performed);
            }
            _ => {}
        }
        Ok(exit)
    }

    /// Runs the guest until it reports DONE or PANIC, or something else ends the run.
    pub fn run(&mut self, limits: &RunLimits) -> Result<Outcome> {
        let start = Instant::now();
        let deadline = self.watchdog.arm(limits.wall);
        let mut exits = 0;
        let verdict = loop {
            if exits == limits.max_exits {
                break Verdict::BudgetExhausted { exits };
            }
            let exit = self.run_once();
            exits += 1;
            let exit = match exit {
                Ok(exit) => exit,
                Err(e) => {
                    self.watchdog.disarm();
                    return Err(e);
                }
            };
            if let Some(verdict) = self.classify(&exit, deadline, limits.wall) {
                break verdict;
            }
        };
        self.watchdog.disarm();
        Ok(Outcome { verdict, counters: self.mailbox()?.counters, exits, elapsed: start.elapsed() })
    }

    /// Decides whether `exit` ends a run with the given deadline and wall-clock limit, and
    /// how (see [`classify_exit`]).
    pub fn classify(&self, exit: &Exit, deadline: Instant, limit: Duration) -> Option<Verdict> {
        classify_exit(exit, self.regs().rip, &self.image, deadline, limit, |code| self.report(code))
    }
}

/// The one exit classifier: whether `exit`, taken at `rip`, ends a run with the given deadline
/// and wall-clock limit, and with which verdict; `report` turns a report code into one. Console
/// and ping output, ring-3 points, emulated `int3`s and watchdog kicks before the deadline do
/// not end a run.
pub(crate) fn classify_exit(
    exit: &Exit,
    rip: u64,
    image: &GuestImage,
    deadline: Instant,
    limit: Duration,
    report: impl FnOnce(u32) -> Verdict,
) -> Option<Verdict> {
    let symbol = || image.symbolize(rip);
    match exit {
        Exit::IoOut { port: port::CONSOLE | port::PING, .. } => None,
        Exit::Mmio { address: USER_POINT_ADDRESS, write: true } => None,
        Exit::IoOut { port: port::REPORT, value, .. } => Some(report(*value)),
        Exit::Int3Performed => None,
        Exit::EmulationFailure { bytes } => {
            Some(Verdict::EmulationError { rip, symbol: symbol(), bytes: bytes.clone() })
        }
        Exit::Shutdown => Some(Verdict::TripleFault { rip, symbol: symbol() }),
        Exit::Interrupted if Instant::now() >= deadline => {
            Some(Verdict::Timeout { limit, rip, symbol: symbol() })
        }
        Exit::Interrupted => None,
        other => Some(Verdict::UnexpectedExit { description: format!("{other} at {}", symbol()) }),
    }
}
