//! Counters shared by every client of a campaign, and the stop request.
//!
//! They live in one anonymous shared mapping made before the Launcher forks, so the clients
//! (and the clients a respawner restarts) update the same counters: `--runs` counts the
//! executions of all clients, the first crash stops every client, and the main process prints
//! the final summary and picks the exit code from them. Across machines (`--remote-broker`)
//! each machine has its own.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Most clients one machine runs.
pub const MAX_CLIENTS: usize = 64;

/// One client's counters.
#[derive(Debug, Default)]
#[repr(C)]
pub struct ClientCounters {
    /// Executions of the target.
    pub executions: AtomicU64,
    /// Nanoseconds spent inside `Target::execute`.
    pub target_nanos: AtomicU64,
    /// Nanoseconds of fuzzing (the evaluation of the initial inputs and the whole loop,
    /// LibAFL included): every execution's target time lies inside it.
    pub loop_nanos: AtomicU64,
    /// Corpus entries (own finds and imports).
    pub corpus: AtomicU64,
    /// Corpus entries received from other clients (of this campaign or, through a remote
    /// broker, of another).
    pub imported: AtomicU64,
    /// Executions that ended in a finding.
    pub crashes: AtomicU64,
    /// Edges covered.
    pub edges: AtomicU64,
    /// Nanoseconds from the campaign start to this client's first crash (0: none yet).
    pub first_crash_nanos: AtomicU64,
}

/// The campaign's shared counters.
#[derive(Debug)]
#[repr(C)]
pub struct Shared {
    /// Set by the first client that must end the campaign (a crash without `--keep-going`).
    pub stop: AtomicBool,
    /// Set by a client that saw SIGINT.
    pub interrupted: AtomicBool,
    /// Executions of all clients, for `--runs`.
    pub total_executions: AtomicU64,
    /// Clients that have returned (done or failed), for the broker to know when to stop.
    pub finished: AtomicU64,
    /// Per client, indexed by the client's number.
    pub clients: [ClientCounters; MAX_CLIENTS],
}

impl Shared {
    /// A zeroed block in a `MAP_SHARED` anonymous mapping that forked children share. It is
    /// never unmapped: it lives as long as the process.
    pub fn new() -> &'static Self {
        let size = size_of::<Self>();
        // SAFETY: a fresh anonymous mapping; no existing memory is affected, and the result
        // is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(
            ptr != libc::MAP_FAILED,
            "mmap of {size} bytes failed: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the mapping is page-aligned, large enough and zero-filled; all-zero bytes are
        // a valid `Shared` (atomics of zero). It is never unmapped, so `'static` holds.
        unsafe { &*ptr.cast::<Self>() }
    }

    /// The counters of client `index` (folded into the table if there are more clients).
    pub fn client(&self, index: usize) -> &ClientCounters {
        &self.clients[index % MAX_CLIENTS]
    }

    /// Asks every client to stop.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Whether a client asked every client to stop.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Counts a client that has returned.
    pub fn client_finished(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    /// How many clients have returned.
    pub fn finished(&self) -> usize {
        self.finished.load(Ordering::Relaxed) as usize
    }

    /// The sum over clients, and the clients that executed anything.
    pub fn totals(&self) -> Totals {
        let mut totals = Totals::default();
        for (index, c) in self.clients.iter().enumerate() {
            let executions = c.executions.load(Ordering::Relaxed);
            if executions == 0 {
                continue;
            }
            totals.clients.push((index, executions));
            totals.executions += executions;
            totals.target += Duration::from_nanos(c.target_nanos.load(Ordering::Relaxed));
            totals.fuzzing += Duration::from_nanos(c.loop_nanos.load(Ordering::Relaxed));
            totals.corpus = totals.corpus.max(c.corpus.load(Ordering::Relaxed));
            totals.imported += c.imported.load(Ordering::Relaxed);
            totals.crashes += c.crashes.load(Ordering::Relaxed);
            totals.edges = totals.edges.max(c.edges.load(Ordering::Relaxed));
            let first = c.first_crash_nanos.load(Ordering::Relaxed);
            if first > 0 {
                let first = Duration::from_nanos(first);
                totals.first_crash =
                    Some(totals.first_crash.map_or(first, |t: Duration| t.min(first)));
            }
        }
        totals
    }
}

/// Campaign totals for the summary.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    /// `(client number, executions)` of each client that executed anything.
    pub clients: Vec<(usize, u64)>,
    /// Executions of all clients.
    pub executions: u64,
    /// Time inside `Target::execute`, all clients.
    pub target: Duration,
    /// Time in the fuzzing loops, all clients.
    pub fuzzing: Duration,
    /// The largest client corpus.
    pub corpus: u64,
    /// Entries clients received from each other.
    pub imported: u64,
    /// Executions that ended in a finding.
    pub crashes: u64,
    /// The most edges a client covered.
    pub edges: u64,
    /// From the campaign start to the first crash.
    pub first_crash: Option<Duration>,
}

impl Totals {
    /// Mean time per execution outside the target (mutation, observers, feedback, scheduler,
    /// events), and that time's share of the fuzzing loop.
    pub fn overhead(&self) -> Option<(Duration, f64)> {
        if self.executions == 0 || self.fuzzing.is_zero() {
            return None;
        }
        let outside = self.fuzzing.saturating_sub(self.target);
        let per_execution = Duration::from_secs_f64(outside.as_secs_f64() / self.executions as f64);
        Some((per_execution, outside.as_secs_f64() / self.fuzzing.as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_shared_with_a_forked_child() {
        let shared = Shared::new();
        // SAFETY: the child only touches atomics in the shared mapping and calls _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            shared.client(1).executions.fetch_add(7, Ordering::Relaxed);
            shared.request_stop();
            // SAFETY: ends the child without running the parent's test harness again.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(shared.stop_requested());
        assert_eq!(shared.totals().clients, vec![(1, 7)]);
    }
}
