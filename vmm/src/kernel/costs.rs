//! What the real-kernel VM's basic operations cost, for `nmifuzz bench --kernel`.

use std::time::{Duration, Instant};

use super::KernelVm;
use super::exits::{Handled, handle_exit};
use crate::error::{Error, Result};

impl KernelVm {
    /// Bare exit round trips: after a run that ended at Done, the agent writes Done to the
    /// doorbell again and again, so each KVM_RUN returns at the next write (one MMIO exit and
    /// a few user instructions). Call right after [`KernelVm::execute`].
    pub fn time_exit_round_trips(&mut self, samples: u32) -> Result<Vec<Duration>> {
        let mut times = Vec::with_capacity(samples as usize);
        for _ in 0..samples {
            let started = Instant::now();
            match handle_exit(&mut self.vcpu, &mut self.uart, &mut self.cmos)? {
                Handled::Agent(_) => times.push(started.elapsed()),
                _ => return Err(Error::Kernel("the agent did not write Done again".into())),
            }
        }
        self.io_pending = true;
        Ok(times)
    }

    /// One reset back to the snapshot: its time and the memory pages it restored.
    pub fn time_reset(&mut self) -> Result<(Duration, usize)> {
        let started = Instant::now();
        let pages = self.reset()?;
        Ok((started.elapsed(), pages))
    }
}
