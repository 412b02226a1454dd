//! Shared memory for LLMP that a killed campaign cannot leak.
//!
//! On Linux, LibAFL 0.16.1's `StdShMemProvider` is System V shared memory (`shmget`): a
//! segment lives until its creator removes it (`IPC_RMID`, in its `Drop`), so a `--cores`
//! campaign killed with SIGKILL left every segment behind, and they stay until reboot or
//! `ipcrm` (seven segments of 256 MiB for two clients, measured).
//!
//! [`SelfRemovingShMemProvider`] marks each segment for removal as soon as it has made it.
//! Linux then keeps the segment while any process has it attached, and it still lets other
//! processes attach it by its id (a Linux extension: shmat(2), NOTES), which is how LLMP hands
//! pages between the broker and the clients. The kernel frees the segment when the last
//! process using it detaches, and a process killed with SIGKILL detaches as it dies.

use libafl::Error;
use libafl_bolts::shmem::{ShMem, ShMemId, ShMemProvider, UnixShMem, UnixShMemProvider};

/// LibAFL's SysV provider, with each segment removed once every user of it is gone.
#[derive(Clone, Debug, Default)]
pub struct SelfRemovingShMemProvider(UnixShMemProvider);

impl ShMemProvider for SelfRemovingShMemProvider {
    type ShMem = UnixShMem;

    fn new() -> Result<Self, Error> {
        UnixShMemProvider::new().map(Self)
    }

    fn new_shmem(&mut self, map_size: usize) -> Result<UnixShMem, Error> {
        let shmem = self.0.new_shmem(map_size)?;
        let id: i32 = shmem.id().into();
        // SAFETY: `id` is the segment just made and still attached (by `shmem`); IPC_RMID
        // takes no buffer. The segment stays usable until its last detach.
        if unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) } != 0 {
            return Err(Error::last_os_error(format!(
                "cannot mark shared memory segment {id} for removal"
            )));
        }
        // The owner's `Drop` marks it again and detaches: harmless, since it is still
        // attached until then, so the id cannot have been reused.
        Ok(shmem)
    }

    fn shmem_from_id_and_size(&mut self, id: ShMemId, size: usize) -> Result<UnixShMem, Error> {
        self.0.shmem_from_id_and_size(id, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether /proc/sysvipc/shm lists segment `id` as made by this process (the id alone
    /// could be reused by another process's new segment).
    fn exists(id: i32) -> bool {
        let (id, pid) = (id.to_string(), std::process::id().to_string());
        std::fs::read_to_string("/proc/sysvipc/shm").unwrap().lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields[1] == id && fields[4] == pid // shmid, cpid
        })
    }

    #[test]
    fn a_segment_is_shared_while_attached_and_gone_after_the_last_detach() {
        let mut provider = SelfRemovingShMemProvider::new().unwrap();
        let mut owner = provider.new_shmem(4096).unwrap();
        owner[0] = 42;
        let id: i32 = owner.id().into();
        // Attached again by id, as a broker maps a client's page.
        let other = provider.shmem_from_id_and_size(owner.id(), 4096).unwrap();
        assert_eq!(other[0], 42);
        drop(owner);
        assert!(exists(id), "still attached by `other`");
        assert_eq!(other[0], 42);
        drop(other);
        assert!(!exists(id), "freed with the last detach");
    }
}
