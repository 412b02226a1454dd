//! A real Linux kernel as the target: booted from a bzImage with nmifuzz's agent as `/init`,
//! snapshotted at the agent's Ready, and run again and again from there with NMIs at exact
//! instructions of the kernel's own entry code.
//!
//! - [`boot`], [`cpu`], [`mptable`], [`layout`]: loading the kernel and starting the vCPU;
//! - [`devices`]: the serial console and the CMOS clock (the rest is KVM's in-kernel irqchip
//!   and PIT);
//! - [`initramfs`]: the archive holding the agent (`agent/`);
//! - [`state`]: the machine state every run starts from;
//! - [`symbols`]: the kernel's symbols;
//! - `ready`: the boot to the agent's Ready; `exits`: one vCPU exit at a time;
//! - [`schedule`]: what a run does; `exec`: doing it; `oracles` and [`verdict`]: how it ends;
//! - `regions`: the entry code's instructions, where NMIs are placed; `costs`: what the basic
//!   operations cost (`nmifuzz bench --kernel`).
//!
//! The built-in guest's VMM (`crate::vm`) and engine are not used: a real kernel needs an
//! irqchip, timers and a console, and its runs are driven by breakpoints alone.

pub mod boot;
mod costs;
pub mod cpu;
pub mod devices;
mod exec;
mod exits;
pub mod initramfs;
pub mod layout;
pub mod mptable;
mod oracles;
mod ready;
mod regions;
pub mod schedule;
pub mod state;
pub mod symbols;
pub mod verdict;

use std::time::{Duration, Instant};

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use nmifuzz_abi::agent::AGENT_MAILBOX_MAGIC;
use vm_superio::Serial;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use self::devices::{Cmos, Console, IrqTrigger, SERIAL_IRQ, Uart};
use self::exits::flush_io;
use self::ready::{Booting, choose_symbols};
use self::state::MachineState;
use self::symbols::Symbols;
use crate::error::{Error, Result};
use crate::memory::GuestRam;
use crate::watchdog::Watchdog;

pub use self::exec::{Delivery, Execution};

/// The command line: a serial console, no KASLR (symbols stay where the map says), no ACPI or
/// PCI (the VM has neither), no NMI watchdog (its perf NMIs would mix with the injected
/// ones), one CPU, and the agent as init.
pub const CMDLINE: &str = "console=ttyS0 nokaslr reboot=t panic=-1 pci=off acpi=off \
     8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd tsc=reliable \
     no_timer_check nmi_watchdog=0 nosmp rdinit=/init loglevel=4";

/// How to boot a kernel.
pub struct KernelConfig {
    /// The bzImage's bytes.
    pub image: Vec<u8>,
    /// A System.map for it, if the user has one.
    pub system_map: Option<std::path::PathBuf>,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// How long the boot may take.
    pub boot_timeout: Duration,
    /// Copy the console to stderr while booting.
    pub echo_boot: bool,
}

impl KernelConfig {
    /// The defaults for `image`: 256 MiB, five minutes to boot.
    pub fn new(image: Vec<u8>) -> Self {
        Self {
            image,
            system_map: None,
            memory_mib: 256,
            boot_timeout: Duration::from_secs(300),
            echo_boot: false,
        }
    }
}

/// What nmifuzz found out about the kernel at boot.
#[derive(Clone, Debug)]
pub struct KernelFacts {
    /// `asm_exc_nmi`: the NMI entry, where deliveries are seen.
    pub nmi_entry: u64,
    /// The top of the NMI's IST stack (from the TSS).
    pub nmi_stack_top: u64,
    /// The top of the #DB IST stack.
    pub debug_stack_top: u64,
    /// The boot CPU's per-CPU base (`__per_cpu_offset[0]`).
    pub per_cpu_base: u64,
    /// The address of `irq_stat.__nmi_count` (found by calibration).
    pub nmi_count: u64,
    /// Page-table levels (5 with LA57).
    pub paging_levels: u32,
    /// The kernel's CR3 for reading kernel memory.
    pub cr3: u64,
    /// How long the boot took, to the agent's Ready.
    pub boot_time: Duration,
    /// Bytes of guest memory in the snapshot.
    pub snapshot_bytes: u64,
}

/// The VM with a booted kernel, ready to run schedules.
pub struct KernelVm {
    vcpu: VcpuFd,
    vm: VmFd,
    ram: GuestRam,
    _kvm: Kvm,
    uart: Uart,
    cmos: Cmos,
    watchdog: Watchdog,
    state: MachineState,
    symbols: Symbols,
    facts: KernelFacts,
    /// Guest physical address of the agent's mailbox.
    mailbox: u64,
    /// Whether the last exit left an instruction for KVM to finish at the next KVM_RUN.
    io_pending: bool,
}

/// Why this host cannot boot a real kernel in reasonable time, if it cannot: kvm_pvm emulates
/// every ring-0 instruction, and Debian's 6.1 kernel had not reached init after 10 minutes on it.
pub fn host_too_slow() -> Option<String> {
    std::path::Path::new("/sys/module/kvm_pvm").exists().then(|| {
        "this host's KVM is kvm_pvm, which emulates every ring-0 instruction: a real kernel does \
         not boot in useful time on it (Debian's 6.1 had not reached init after 10 minutes). \
         Fuzz real kernels on a host with VMX or SVM, or on the emulated AMD-V host of \
         .ci/stock-kvm (README, \"Fuzzing a real kernel\")"
            .to_owned()
    })
}

impl KernelVm {
    /// Boots the kernel to the agent's Ready and takes the snapshot. Refuses at once on a host
    /// that is too slow for it ([`host_too_slow`]).
    pub fn boot(config: &KernelConfig) -> Result<Self> {
        if let Some(why) = host_too_slow() {
            return Err(Error::Kernel(why));
        }
        let started = Instant::now();
        let kvm = crate::kvm::open(std::path::Path::new(crate::kvm::KVM_DEVICE))?;
        let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        // Both only matter on Intel; AMD ignores them.
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP)
            .map_err(Error::kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.set_tss_address(layout::KVM_TSS).map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(Error::kvm("KVM_CREATE_PIT2"))?;
        let mut ram = GuestRam::new(&vm, config.memory_mib << 20)?;
        let initramfs = initramfs::build(initramfs::AGENT);
        let loaded = boot::load(ram.mmap(), ram.size(), &config.image, &initramfs, CMDLINE)?;
        let irq = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| Error::Kernel(format!("cannot create the serial IRQ's eventfd: {e}")))?;
        vm.register_irqfd(&irq, SERIAL_IRQ).map_err(Error::kvm("KVM_IRQFD"))?;
        let vcpu = vm.create_vcpu(0).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        cpu::setup(&kvm, &vcpu, loaded.entry)?;
        let mut console = Console::default();
        console.echo = config.echo_boot;
        let mut booting = Booting {
            vcpu,
            uart: Serial::new(IrqTrigger(irq), console),
            cmos: Cmos::default(),
            mailbox: None,
            symbols_text: None,
        };
        let watchdog = Watchdog::new()?;
        booting.run_to_ready(&ram, &watchdog, started + config.boot_timeout)?;
        let Booting { mut vcpu, mut uart, cmos, mailbox, symbols_text } = booting;
        flush_io(&mut vcpu)?;
        uart.writer_mut().echo = false;
        uart.writer_mut().take_lines();
        let state = MachineState::take(&kvm, &vm, &vcpu, &mut ram)?;
        let symbols = choose_symbols(config, symbols_text)?;
        let mailbox_address = mailbox.ok_or_else(|| {
            Error::Kernel("the agent reached Ready without saying where its mailbox is".into())
        })?;
        let levels = if state.sregs().cr4 & (1 << 12) != 0 { 5 } else { 4 };
        let cr3 = state.sregs().cr3;
        let mailbox = ram
            .translate_with_levels(cr3, mailbox_address, levels)
            .ok_or_else(|| Error::Kernel("the agent's mailbox is not mapped".into()))?;
        let magic = ram.read_u64(mailbox)?;
        if magic != AGENT_MAILBOX_MAGIC {
            return Err(Error::Kernel(format!("the agent's mailbox has magic {magic:#x}")));
        }
        let facts = KernelFacts {
            nmi_entry: symbols.require("asm_exc_nmi", "seeing NMI deliveries")?,
            nmi_stack_top: 0,
            debug_stack_top: 0,
            per_cpu_base: 0,
            nmi_count: 0,
            paging_levels: levels,
            cr3,
            boot_time: started.elapsed(),
            snapshot_bytes: ram.size(),
        };
        let mut kernel = Self {
            vcpu,
            vm,
            ram,
            _kvm: kvm,
            uart,
            cmos,
            watchdog,
            state,
            symbols,
            facts,
            mailbox,
            io_pending: false,
        };
        kernel.learn_facts()?;
        Ok(kernel)
    }

    /// The kernel's symbols.
    pub fn symbols(&self) -> &Symbols {
        &self.symbols
    }

    /// What was found at boot.
    pub fn facts(&self) -> &KernelFacts {
        &self.facts
    }

    /// Reads `len` bytes of kernel virtual memory, if mapped.
    pub fn read_virtual(&self, address: u64, len: usize) -> Option<Vec<u8>> {
        let mut bytes = Vec::with_capacity(len);
        while bytes.len() < len {
            let at = address + bytes.len() as u64;
            let physical =
                self.ram.translate_with_levels(self.facts.cr3, at, self.facts.paging_levels)?;
            let in_page = (0x1000 - (at & 0xfff) as usize).min(len - bytes.len());
            let mut chunk = vec![0; in_page];
            self.ram.read(physical, &mut chunk).ok()?;
            bytes.extend_from_slice(&chunk);
        }
        Some(bytes)
    }

    /// Writes `bytes` to kernel virtual memory (restored at the next reset, like any page the
    /// host writes).
    pub fn write_virtual(&mut self, address: u64, bytes: &[u8]) -> Result<()> {
        for (i, byte) in bytes.iter().enumerate() {
            let at = address + i as u64;
            let physical = self
                .ram
                .translate_with_levels(self.facts.cr3, at, self.facts.paging_levels)
                .ok_or_else(|| Error::Kernel(format!("{at:#x} is not mapped")))?;
            self.ram.write(physical, &[*byte])?;
        }
        Ok(())
    }

    /// Reads a u64 of kernel virtual memory.
    pub fn read_virtual_u64(&self, address: u64) -> Option<u64> {
        let bytes = self.read_virtual(address, 8)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }

    /// The stacks from the TSS and the per-CPU base; `__nmi_count` is found by [`exec`]'s
    /// calibration.
    fn learn_facts(&mut self) -> Result<()> {
        // The TSS's IST entries start at offset 0x24; Linux's NMI stack is IST index 1 and
        // the #DB stack index 2 (arch/x86/include/asm/page_64_types.h).
        let tss = self.state.sregs().tr.base;
        let ist = |index: u64| self.read_virtual_u64(tss + 0x24 + 8 * index);
        let unreadable = || Error::Kernel("cannot read the kernel's TSS".into());
        let (nmi, debug) = (ist(1).ok_or_else(unreadable)?, ist(2).ok_or_else(unreadable)?);
        (self.facts.nmi_stack_top, self.facts.debug_stack_top) = (nmi, debug);
        let offsets = self.symbols.require("__per_cpu_offset", "finding per-CPU data")?;
        self.facts.per_cpu_base = self.read_virtual_u64(offsets).ok_or_else(|| {
            Error::Kernel("cannot read __per_cpu_offset[0] in guest memory".into())
        })?;
        self.facts.nmi_count = self.calibrate_nmi_count()?;
        Ok(())
    }
}
