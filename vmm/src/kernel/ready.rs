//! Booting to the agent's Ready: the vCPU loop before there is a snapshot, the agent's
//! messages at boot, and the choice of symbols.

use std::time::Instant;

use kvm_ioctls::VcpuFd;
use nmifuzz_abi::agent::AgentMessage;

use super::KernelConfig;
use super::devices::{Cmos, Uart};
use super::exits::{Handled, handle_exit};
use super::symbols::{SymbolSource, Symbols};
use crate::error::{Error, Result};
use crate::memory::GuestRam;
use crate::watchdog::Watchdog;

/// The VM while it boots, before there is a snapshot.
pub(super) struct Booting {
    pub(super) vcpu: VcpuFd,
    pub(super) uart: Uart,
    pub(super) cmos: Cmos,
    pub(super) mailbox: Option<u64>,
    pub(super) symbols_text: Option<String>,
}

impl Booting {
    /// Runs the vCPU until the agent says Ready.
    pub(super) fn run_to_ready(
        &mut self,
        ram: &GuestRam,
        watchdog: &Watchdog,
        deadline: Instant,
    ) -> Result<()> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(self.failed("did not reach the agent's Ready in time"));
            }
            watchdog.arm(deadline - now);
            let exit = handle_exit(&mut self.vcpu, &mut self.uart, &mut self.cmos);
            watchdog.disarm();
            match exit? {
                Handled::Continue | Handled::Interrupted => {}
                Handled::Debug(_) => {}
                Handled::Shutdown => return Err(self.failed("triple-faulted while booting")),
                Handled::Agent(call) => match call.message {
                    Some(AgentMessage::Hello) => self.mailbox = Some(call.rdi),
                    Some(AgentMessage::Symbols) => {
                        let text = read_user(&self.vcpu, ram, call.rdi, call.rsi)?;
                        self.symbols_text = Some(String::from_utf8_lossy(&text).into_owned());
                    }
                    Some(AgentMessage::Log) => {
                        let text = read_user(&self.vcpu, ram, call.rdi, call.rsi.min(4096))?;
                        eprintln!("agent: {}", String::from_utf8_lossy(&text).trim_end());
                    }
                    Some(AgentMessage::Ready) => return Ok(()),
                    Some(AgentMessage::Done) | None => {}
                },
            }
        }
    }

    /// A boot error with the console's last lines.
    fn failed(&self, what: &str) -> Error {
        let lines = self.uart.writer().lines();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
        Error::Kernel(format!("the kernel {what}; its console ended with:\n  {tail}"))
    }
}

/// The System.map's symbols if it is a real one, else the kernel's own.
pub(super) fn choose_symbols(config: &KernelConfig, kallsyms: Option<String>) -> Result<Symbols> {
    if let Some(path) = &config.system_map {
        match Symbols::from_system_map(path)? {
            Ok(symbols) => return Ok(symbols),
            Err(why) => eprintln!("INFO: {why}; using the kernel's /proc/kallsyms instead"),
        }
    }
    let text = kallsyms.ok_or_else(|| {
        Error::Kernel("the agent sent no /proc/kallsyms and there is no usable System.map".into())
    })?;
    let symbols = Symbols::parse(&text, SymbolSource::Kallsyms);
    if symbols.address("asm_exc_nmi") == Some(0) {
        return Err(Error::Kernel("/proc/kallsyms shows zero addresses (kptr_restrict)".into()));
    }
    Ok(symbols)
}

/// Reads `len` bytes at user address `address` through the page tables of the current CR3.
fn read_user(vcpu: &VcpuFd, ram: &GuestRam, address: u64, len: u64) -> Result<Vec<u8>> {
    let sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    let levels = if sregs.cr4 & (1 << 12) != 0 { 5 } else { 4 };
    let mut bytes = Vec::with_capacity(len as usize);
    while (bytes.len() as u64) < len {
        let at = address + bytes.len() as u64;
        let physical = ram
            .translate_with_levels(sregs.cr3, at, levels)
            .ok_or_else(|| Error::Kernel(format!("the agent's buffer at {at:#x} is not mapped")))?;
        let in_page = (0x1000 - (at & 0xfff)).min(len - bytes.len() as u64) as usize;
        let mut chunk = vec![0; in_page];
        ram.read(physical, &mut chunk)?;
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}
