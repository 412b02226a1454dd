//! Raw Linux x86-64 system calls: the agent has no libc.
//!
//! Every call goes through [`syscall`] (the `syscall` instruction with the kernel's calling
//! convention: number in RAX, arguments in RDI, RSI, RDX, R10, R8, R9; RCX and R11 are
//! clobbered). The thin wrappers below are safe when the call cannot break memory safety (it
//! only reads the arguments it is given, or creates a new mapping), `unsafe` otherwise.

use core::arch::asm;
use core::ffi::CStr;

/// The system call numbers the agent uses (arch/x86/entry/syscalls/syscall_64.tbl).
pub mod nr {
    pub const READ: u64 = 0;
    #[cfg(feature = "host-test")]
    pub const WRITE: u64 = 1;
    pub const OPEN: u64 = 2;
    pub const CLOSE: u64 = 3;
    pub const MMAP: u64 = 9;
    pub const MUNMAP: u64 = 11;
    pub const RT_SIGACTION: u64 = 13;
    pub const RT_SIGRETURN: u64 = 15;
    pub const GETPPID: u64 = 110;
    pub const SIGALTSTACK: u64 = 131;
    pub const MODIFY_LDT: u64 = 154;
    pub const MOUNT: u64 = 165;
    pub const EXIT_GROUP: u64 = 231;
    pub const PERF_EVENT_OPEN: u64 = 298;
}

/// An error number, as a failed system call returns it (negated) in RAX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub u64);

/// `mount` returns this when /proc is mounted already: not an error for the agent.
pub const EBUSY: Errno = Errno(16);
/// What `perf_event_open` returns when every debug register is taken; the agent returns it too
/// when its own table of breakpoints is full.
pub const ENOSPC: Errno = Errno(28);

/// A system call's result: its return value, or the error.
pub type SysResult = Result<u64, Errno>;

/// Makes system call `number` with `args` and decodes the result: the kernel returns
/// -4095..=-1 for an error, anything else is a value.
///
/// # Safety
///
/// The call must not break the program's memory safety: pointers must be valid for what the
/// kernel does with them, and the call must not unmap, remap or overwrite memory still in use.
pub unsafe fn syscall(number: u64, args: [u64; 6]) -> SysResult {
    let ret: u64;
    // SAFETY: the caller vouches for the call itself; the instruction clobbers only RAX (the
    // result), RCX and R11, all declared, and does not touch this thread's stack.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") number => ret,
            in("rdi") args[0],
            in("rsi") args[1],
            in("rdx") args[2],
            in("r10") args[3],
            in("r8") args[4],
            in("r9") args[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if ret >= 4095u64.wrapping_neg() { Err(Errno(ret.wrapping_neg())) } else { Ok(ret) }
}

/// Ends the process (and, as PID 1, makes the kernel panic: "Attempted to kill init!").
pub fn exit_group(code: u64) -> ! {
    // SAFETY: exit_group does not return, so nothing can observe memory afterwards.
    unsafe {
        asm!("syscall", in("rax") nr::EXIT_GROUP, in("rdi") code, options(noreturn, nostack));
    }
}

/// `open(path, O_RDWR | O_SYNC)`: a new file descriptor.
pub fn open_read_write_sync(path: &CStr) -> SysResult {
    const O_RDWR_SYNC: u64 = 0x2 | 0x10_1000;
    // SAFETY: the kernel only reads the NUL-terminated path.
    unsafe { syscall(nr::OPEN, [path.as_ptr() as u64, O_RDWR_SYNC, 0, 0, 0, 0]) }
}

/// `mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset)`: a mapping of `fd`.
pub fn mmap_shared(len: u64, fd: u64, offset: u64) -> SysResult {
    const PROT_READ_WRITE: u64 = 0x1 | 0x2;
    const MAP_SHARED: u64 = 0x01;
    // SAFETY: without MAP_FIXED the kernel picks an unused range: no existing memory changes.
    unsafe { syscall(nr::MMAP, [0, len, PROT_READ_WRITE, MAP_SHARED, fd, offset]) }
}

/// `mount(source, target, fstype, 0, NULL)`.
pub fn mount(source: &CStr, target: &CStr, fstype: &CStr) -> SysResult {
    let [s, t, f] = [source, target, fstype].map(|c| c.as_ptr() as u64);
    // SAFETY: the kernel only reads the three NUL-terminated strings.
    unsafe { syscall(nr::MOUNT, [s, t, f, 0, 0, 0]) }
}

/// `open(path, O_RDONLY)`: a new file descriptor.
pub fn open_read_only(path: &CStr) -> SysResult {
    // SAFETY: the kernel only reads the NUL-terminated path.
    unsafe { syscall(nr::OPEN, [path.as_ptr() as u64, 0, 0, 0, 0, 0]) }
}

/// `read(fd, buf)`: the number of bytes read into `buf`, 0 at the end of the file.
pub fn read(fd: u64, buf: &mut [u8]) -> SysResult {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which we borrow mutably.
    unsafe { syscall(nr::READ, [fd, buf.as_mut_ptr() as u64, buf.len() as u64, 0, 0, 0]) }
}

/// `write(fd, buf)`.
#[cfg(feature = "host-test")]
pub fn write(fd: u64, buf: &[u8]) -> SysResult {
    // SAFETY: the kernel only reads `buf`.
    unsafe { syscall(nr::WRITE, [fd, buf.as_ptr() as u64, buf.len() as u64, 0, 0, 0]) }
}

/// `close(fd)`.
pub fn close(fd: u64) -> SysResult {
    // SAFETY: closing a descriptor touches no memory of ours.
    unsafe { syscall(nr::CLOSE, [fd, 0, 0, 0, 0, 0]) }
}

/// `mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)`: the
/// address of a new zero-filled mapping whose pages the kernel allocates at their first touch.
pub fn mmap_anonymous(len: u64) -> SysResult {
    const PROT_READ_WRITE: u64 = 0x1 | 0x2;
    const MAP_PRIVATE_ANONYMOUS_NORESERVE: u64 = 0x02 | 0x20 | 0x4000;
    let args = [0, len, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS_NORESERVE, u64::MAX, 0];
    // SAFETY: without MAP_FIXED the kernel picks an unused range: no existing memory changes.
    unsafe { syscall(nr::MMAP, args) }
}

/// `munmap(addr, len)`.
///
/// # Safety
///
/// Nothing may use the range afterwards.
pub unsafe fn munmap(addr: u64, len: u64) -> SysResult {
    // SAFETY: the caller guarantees the range is no longer in use.
    unsafe { syscall(nr::MUNMAP, [addr, len, 0, 0, 0, 0]) }
}

/// `getppid()`.
pub fn getppid() -> SysResult {
    // SAFETY: getppid touches no memory.
    unsafe { syscall(nr::GETPPID, [0; 6]) }
}
