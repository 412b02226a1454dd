//! Booting a fresh vCPU to the guest's READY report, where the snapshot is taken.

use std::time::Duration;

use kvm_ioctls::VcpuFd;
use nmifuzz_abi::{Report, port};

use crate::error::{Error, Result};
use crate::exit::{self, Exit};
use crate::image::GuestImage;
use crate::outcome::Verdict;
use crate::watchdog::Watchdog;

use super::classify_exit;

/// Runs a freshly created vCPU until the guest reports READY.
pub(super) fn boot_to_ready(
    vcpu: &mut VcpuFd,
    watchdog: &Watchdog,
    image: &GuestImage,
    console: &mut Vec<u8>,
    timeout: Duration,
) -> Result<()> {
    let deadline = watchdog.arm(timeout);
    let failed = |verdict: Verdict, console: &[u8]| Error::Boot {
        verdict: Box::new(verdict),
        console: if console.is_empty() {
            String::new()
        } else {
            format!("\nguest console:\n{}", String::from_utf8_lossy(console))
        },
    };
    let result = loop {
        let exit = match exit::run(vcpu) {
            Ok(exit) => exit,
            Err(e) => break Err(e),
        };
        let rip = vcpu.sync_regs().regs.rip;
        let verdict = match exit {
            Exit::IoOut { port: port::CONSOLE, value, .. } => {
                console.push(value as u8);
                continue;
            }
            Exit::IoOut { port: port::REPORT, value, .. }
                if Report::from_code(value) == Some(Report::Ready) =>
            {
                break Ok(());
            }
            // Before READY the mailbox means nothing yet: any other report is unexpected.
            ref exit => match classify_exit(exit, rip, image, deadline, timeout, |code| {
                Verdict::UnexpectedExit { description: format!("report {code:#x} before READY") }
            }) {
                Some(verdict) => verdict,
                None => continue,
            },
        };
        break Err(failed(verdict, console));
    };
    watchdog.disarm();
    result
}

/// Enters KVM_RUN with `immediate_exit` set: KVM applies pending sync registers and completes
/// a pending I/O instruction (stock KVM finishes an `out` only on the next entry) and returns
/// at once without running guest code.
pub(super) fn flush_pending_io(vcpu: &mut VcpuFd) -> Result<()> {
    match enter_without_running(vcpu)? {
        Exit::Interrupted => Ok(()),
        other => Err(Error::Flush(format!("{other:?}"))),
    }
}

/// Most entries [`finish_instruction`] makes. A `rep insb` with a huge count is the longest
/// to finish: KVM's emulator answers it in batches of at least one byte and goes back to the
/// guest, ending the instruction's part of the entry, after at most 1,024 iterations.
const FINISH_ENTRIES: u32 = 4_096;

/// Finishes the instruction the last exit left unfinished (an `in`, or a read of memory with
/// nothing behind it, that KVM's emulator was running): KVM finishes it at the next entry with
/// the registers it decoded it with, and writes RIP and its destination back over whatever was
/// queued for that entry. Whatever the finish does (more I/O for a string `in`, a debug exit
/// when single-stepping, a fault) is the old run's and is discarded; only a finish that never
/// ends is an error.
pub(super) fn finish_instruction(vcpu: &mut VcpuFd) -> Result<()> {
    for _ in 0..FINISH_ENTRIES {
        if let Exit::Interrupted = enter_without_running(vcpu)? {
            return Ok(());
        }
    }
    Err(Error::Flush(format!("an I/O instruction still unfinished after {FINISH_ENTRIES} entries")))
}

/// One KVM_RUN with `immediate_exit` set: KVM does what it must before running guest code
/// (apply sync registers, finish a pending instruction) and returns `Interrupted`, or the exit
/// that finishing the instruction ended in.
fn enter_without_running(vcpu: &mut VcpuFd) -> Result<Exit> {
    vcpu.set_kvm_immediate_exit(1);
    let result = exit::run(vcpu);
    vcpu.set_kvm_immediate_exit(0);
    result
}
