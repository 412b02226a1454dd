//! Fuzzing a real Linux kernel (`nmifuzz run --kernel`): the target ([`KernelTarget`]: the
//! booted kernel, its identity and the points NMIs may arrive at), the input
//! ([`input`]), the campaign ([`campaign`]), the replay ([`replay`]) and minimization ([`tmin`])
//! of its reproducers, and its costs ([`bench`]).

pub mod bench;
pub mod campaign;
pub mod input;
pub mod replay;
pub mod tmin;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use vmm::hash::fnv1a;
use vmm::kernel::schedule::{KernelId, KernelSchedule};
use vmm::kernel::verdict::KernelVerdict;
use vmm::kernel::{Execution, KernelConfig, KernelVm};

use self::input::Points;

/// How many times the limit a run that did not finish in time gets before it is a hang.
const HANG_CONFIRMATION: u32 = 4;

/// The booted kernel, what identifies it, and where NMIs may arrive in it.
pub struct KernelTarget {
    /// The VM.
    pub vm: KernelVm,
    /// The kernel's identity, recorded in every reproducer.
    pub id: KernelId,
    /// The entry code's instructions.
    pub points: Points,
}

impl KernelTarget {
    /// Boots `kernel` (a bzImage) with the agent, printing progress.
    pub fn boot(kernel: &Path, system_map: Option<&Path>) -> Result<Self> {
        if let Some(why) = vmm::kernel::host_too_slow() {
            bail!("{why}");
        }
        let image = std::fs::read(kernel)
            .with_context(|| format!("cannot read the kernel {}", kernel.display()))?;
        if image.get(0x202..0x206) != Some(b"HdrS") {
            bail!("{} is not a bzImage (no \"HdrS\" setup header at 0x202)", kernel.display());
        }
        let id = KernelId {
            path: absolute(kernel).display().to_string(),
            system_map: system_map.map(|m| absolute(m).display().to_string()),
            hash: format!("{:016x}", fnv1a(&image)),
        };
        // Progress on stderr: stdout is for results (`replay --json` prints one object a line).
        eprintln!(
            "INFO: booting {} ({} KiB, fnv1a {}) with the nmifuzz agent as /init ...",
            kernel.display(),
            image.len() >> 10,
            id.hash
        );
        let started = Instant::now();
        let mut config = KernelConfig::new(image);
        config.system_map = system_map.map(Path::to_path_buf);
        let vm =
            KernelVm::boot(&config).with_context(|| format!("booting {}", kernel.display()))?;
        let facts = vm.facts();
        eprintln!(
            "INFO: booted to the agent in {:.1} s; {} symbols from {}; {}-level paging; NMI stack \
             top {:#x}; snapshot {} MiB",
            started.elapsed().as_secs_f64(),
            vm.symbols().len(),
            vm.symbols().source(),
            facts.paging_levels,
            facts.nmi_stack_top,
            facts.snapshot_bytes >> 20
        );
        let points = entry_points(&vm)?;
        Ok(Self { vm, id, points })
    }

    /// Boots the kernel `schedule` was made for, refusing another one with the same path.
    pub fn for_schedule(schedule: &KernelSchedule, file: &Path) -> Result<Self> {
        let kernel = PathBuf::from(&schedule.kernel.path);
        let target = Self::boot(&kernel, schedule.kernel.system_map.as_deref().map(Path::new))
            .with_context(|| format!("{} names the kernel {}", file.display(), kernel.display()))?;
        if target.id.hash != schedule.kernel.hash {
            bail!(
                "{} was made on a kernel with hash {}, but {} now has hash {}",
                file.display(),
                schedule.kernel.hash,
                kernel.display(),
                target.id.hash
            );
        }
        Ok(target)
    }

    /// Runs one schedule. A run that does not finish in time is run again with four times the
    /// limit before it counts as a hang: on a slow host (the emulated one, a busy machine) a
    /// run that stops often for the VMM's breakpoints can take long and still be fine.
    pub fn execute(&mut self, schedule: &KernelSchedule, timeout: Duration) -> Result<Execution> {
        let execution = self.vm.execute(schedule, timeout)?;
        if !matches!(execution.verdict, KernelVerdict::Hang { .. }) {
            return Ok(execution);
        }
        let mut again = self.vm.execute(schedule, timeout * HANG_CONFIRMATION)?;
        again.trace.insert(
            0,
            format!("(the run did not finish in {timeout:?}; run again with {HANG_CONFIRMATION}x the limit)"),
        );
        Ok(again)
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The instructions NMIs are placed at, decoded from the kernel's memory:
/// - `asm_exc_nmi` and its labels, up to the next global function;
/// - the SYSCALL entry up to its call into C (the gap with the user's RSP, the stack switch,
///   the frame);
/// - the first instructions of the #DB and #PF entries, and the return to user
///   (`swapgs_restore_regs_and_return_to_usermode` to its IRET).
fn entry_points(vm: &KernelVm) -> Result<Points> {
    let region = |name: &str, max: usize, stop_at_call: bool| -> Result<Vec<String>> {
        let addresses = vm.instructions(name, max, stop_at_call)?;
        Ok(addresses.into_iter().map(|a| vm.symbols().describe(a)).collect())
    };
    let mut other = Vec::new();
    for (name, max) in [
        ("asm_exc_debug", 6),
        ("asm_exc_page_fault", 6),
        ("swapgs_restore_regs_and_return_to_usermode", 40),
    ] {
        other.extend(region(name, max, false)?);
    }
    Ok(Points {
        nmi: region("asm_exc_nmi", 200, false)?,
        syscall: region("entry_SYSCALL_64", 40, true)?,
        other,
    })
}
