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
    vcpu.set_kvm_immediate_exit(1);
    let result = exit::run(vcpu);
    vcpu.set_kvm_immediate_exit(0);
    match result? {
        Exit::Interrupted => Ok(()),
        other => Err(Error::Flush(format!("{other:?}"))),
    }
}
