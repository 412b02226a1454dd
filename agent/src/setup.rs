//! The set-up before Ready: everything the runs need that must be in the snapshot.
//!
//! A step that fails is logged (by `main`), the rest are skipped, and every run then ends at once
//! with status SETUP: the host always gets Done, never silence.

use core::mem::size_of;
use core::slice;

use nmifuzz_abi::agent::{AGENT_FAULT_PAGES, AgentMessage};

use crate::host;
use crate::signals;
use crate::sys::{self, EBUSY, Errno, nr};

/// The selector of the 16-bit data segment [`prepare`] installs: LDT entry 0 (index 0 in bits
/// 3 and up, TI = 1 for the LDT, RPL = 3).
pub const LDT_DATA16_SELECTOR: u64 = 0b111;

const PAGE_SIZE: u64 = 4096;
/// Room for /proc/kallsyms' text (about 4 MiB for a distribution kernel's ~94,000 symbols).
const SYMBOLS_CAPACITY: u64 = 16 << 20;
/// What the agent reports when /proc/kallsyms does not fit in [`SYMBOLS_CAPACITY`].
const EFBIG: Errno = Errno(27);

/// A set-up step that failed, and why.
pub struct SetupError {
    /// What the step did, for the log.
    pub step: &'static str,
    pub errno: Errno,
}

/// A `map_err` for `step`.
fn failed(step: &'static str) -> impl Fn(Errno) -> SetupError {
    move |errno| SetupError { step, errno }
}

/// What the runs use.
pub struct Setup {
    /// The first of [`AGENT_FAULT_PAGES`] pages mapped and never touched before Ready, so that
    /// every run's first write to each one faults (every run starts from the snapshot).
    fault_pages: u64,
    /// `getppid()`'s result (0 for the init process): what SYSCALL's RAX must come back as.
    pub ppid: u64,
}

impl Setup {
    /// The address of fault page `index`.
    pub fn fault_page(&self, index: u32) -> u64 {
        self.fault_pages + u64::from(index) * PAGE_SIZE
    }
}

/// Mounts procfs on /proc (the initramfs has the empty directory), for /proc/kallsyms.
pub fn mount_proc() -> Result<(), SetupError> {
    match sys::mount(c"proc", c"/proc", c"proc") {
        Ok(_) | Err(EBUSY) => Ok(()),
        Err(errno) => Err(SetupError { step: "mounting /proc", errno }),
    }
}

/// Every step after Hello: sends Symbols, maps the fault pages, installs the LDT segment and the
/// signal handlers. (Nothing for WATCH: its breakpoints are per run.)
pub fn prepare() -> Result<Setup, SetupError> {
    send_symbols()?;
    let fault_pages = sys::mmap_anonymous(u64::from(AGENT_FAULT_PAGES) * PAGE_SIZE)
        .map_err(failed("mapping the fault pages"))?;
    install_ldt_data16().map_err(failed("modify_ldt"))?;
    signals::install().map_err(failed("installing the signal handlers"))?;
    let ppid = sys::getppid().map_err(failed("getppid"))?;
    Ok(Setup { fault_pages, ppid })
}

/// Reads /proc/kallsyms into a scratch mapping, sends Symbols with it and unmaps it.
fn send_symbols() -> Result<(), SetupError> {
    let buffer = sys::mmap_anonymous(SYMBOLS_CAPACITY).map_err(failed("mapping a buffer"))?;
    // SAFETY: a fresh mapping of SYMBOLS_CAPACITY bytes, readable and writable, that nothing
    // else uses; its pages are allocated as `read` fills them.
    let text = unsafe { slice::from_raw_parts_mut(buffer as *mut u8, SYMBOLS_CAPACITY as usize) };
    let len = read_kallsyms(text);
    if let Ok(len) = len {
        host::send(AgentMessage::Symbols, buffer, len as u64);
    }
    // SAFETY: `text` is not used after this.
    let _ = unsafe { sys::munmap(buffer, SYMBOLS_CAPACITY) };
    len.map(|_| ())
}

/// Reads /proc/kallsyms into `buf`, until the end of the file: procfs files have no size to ask
/// for. Its length, or an error if it does not fit.
fn read_kallsyms(buf: &mut [u8]) -> Result<usize, SetupError> {
    let fd = sys::open_read_only(c"/proc/kallsyms").map_err(failed("opening /proc/kallsyms"))?;
    let mut len = 0;
    let result = loop {
        if len == buf.len() {
            break Err(SetupError { step: "fitting /proc/kallsyms in 16 MiB", errno: EFBIG });
        }
        match sys::read(fd, &mut buf[len..]) {
            Ok(0) => break Ok(len),
            Ok(n) => len += n as usize,
            Err(errno) => break Err(SetupError { step: "reading /proc/kallsyms", errno }),
        }
    };
    let _ = sys::close(fd);
    result
}

/// Linux's `struct user_desc` (asm/ldt.h), for `modify_ldt`.
#[repr(C)]
struct UserDesc {
    entry_number: u32,
    base_addr: u32,
    limit: u32,
    /// Bit 0 `seg_32bit`, bits 1-2 `contents`, 3 `read_exec_only`, 4 `limit_in_pages`,
    /// 5 `seg_not_present`, 6 `useable`, 7 `lm`.
    flags: u32,
}

/// Installs LDT entry 0 ([`LDT_DATA16_SELECTOR`]): a 16-bit (`seg_32bit` = 0), writable data
/// segment (`contents` = 0, `read_exec_only` = 0) covering 4 GiB from 0, for ESPFIX.
fn install_ldt_data16() -> Result<(), Errno> {
    const LIMIT_IN_PAGES: u32 = 1 << 4;
    const WRITE_LDT: u64 = 1;
    let desc = UserDesc { entry_number: 0, base_addr: 0, limit: 0xf_ffff, flags: LIMIT_IN_PAGES };
    let args = [WRITE_LDT, &raw const desc as u64, size_of::<UserDesc>() as u64, 0, 0, 0];
    // SAFETY: the kernel only reads `desc`; the LDT it changes is used by no code but ESPFIX's.
    unsafe { sys::syscall(nr::MODIFY_LDT, args) }.map(|_| ())
}
