//! WATCH: hardware data breakpoints on kernel addresses, through `perf_event_open`.
//!
//! A breakpoint event bound to this task (pid 0, any CPU) makes the kernel load a debug register
//! whenever the agent runs, so a kernel access to the address (an NMI handler's, say) raises #DB
//! in the kernel. The event counts the hits itself; no signal comes to the agent.

use core::mem::size_of;

use crate::sys::{self, ENOSPC, Errno, nr};

/// The start of Linux's `struct perf_event_attr` (linux/perf_event.h), up to `bp_len`, padded
/// with zeros to `PERF_ATTR_SIZE_VER7` (128 bytes), the size of 6.1's structure. Newer kernels
/// accept an older size.
#[repr(C)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// The bit-fields: `disabled` is bit 0, `exclude_kernel` bit 5, `exclude_hv` bit 6...
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    bp_addr: u64,
    bp_len: u64,
    /// `branch_sample_type` to `sig_data`, all zero.
    rest: [u64; 7],
}

const _: () = assert!(size_of::<PerfEventAttr>() == 128);

const PERF_TYPE_BREAKPOINT: u32 = 5;
const HW_BREAKPOINT_RW: u32 = 3;
const HW_BREAKPOINT_LEN_8: u64 = 8;
const EXCLUDE_HV: u64 = 1 << 6;

/// The breakpoints armed this run: at most four, as x86 has four debug registers.
pub struct Watches {
    fds: [u64; 4],
    len: usize,
}

impl Watches {
    pub const fn new() -> Self {
        Self { fds: [0; 4], len: 0 }
    }

    /// Arms a read/write breakpoint on the 8 bytes at `address`, enabled at once, counting
    /// kernel and user accesses.
    pub fn arm(&mut self, address: u64) -> Result<(), Errno> {
        let Some(slot) = self.fds.get_mut(self.len) else { return Err(ENOSPC) };
        let attr = PerfEventAttr {
            kind: PERF_TYPE_BREAKPOINT,
            size: size_of::<PerfEventAttr>() as u32,
            config: 0,
            sample_period: 1,
            sample_type: 0,
            read_format: 0,
            flags: EXCLUDE_HV,
            wakeup_events: 0,
            bp_type: HW_BREAKPOINT_RW,
            bp_addr: address,
            bp_len: HW_BREAKPOINT_LEN_8,
            rest: [0; 7],
        };
        let (this_task, any_cpu, no_group, no_flags) = (0, u64::MAX, u64::MAX, 0);
        let args = [&raw const attr as u64, this_task, any_cpu, no_group, no_flags, 0];
        // SAFETY: the kernel only reads `attr`; the event it creates touches no memory of ours.
        *slot = unsafe { sys::syscall(nr::PERF_EVENT_OPEN, args) }?;
        self.len += 1;
        Ok(())
    }

    /// Closes every breakpoint armed this run.
    pub fn disarm_all(&mut self) {
        for &fd in &self.fds[..self.len] {
            let _ = sys::close(fd);
        }
        self.len = 0;
    }
}
