//! The wall-clock watchdog: a thread that kicks the vCPU thread out of KVM_RUN with a signal
//! once a run's deadline has passed.
//!
//! A guest that never exits (an IRETQ looping on itself, `vmcall` on kvm_pvm) would otherwise
//! keep KVM_RUN busy forever. The signal handler does nothing; its only effect is that KVM_RUN
//! returns EINTR. Because a kick can land just before KVM_RUN is entered, the watchdog repeats
//! it every tick until the run disarms it.

use std::sync::Arc;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How often the watchdog thread looks at the deadline; also the kick repetition period.
const TICK: Duration = Duration::from_millis(5);

/// No deadline.
const DISARMED: u64 = u64::MAX;

struct Shared {
    /// Deadline in nanoseconds since `epoch`, or [`DISARMED`].
    deadline_ns: AtomicU64,
    /// The pthread to kick.
    target: AtomicU64,
    stop: AtomicBool,
    epoch: Instant,
}

/// A watchdog for one vCPU thread.
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Installs the no-op handler once per process, without SA_RESTART so KVM_RUN returns EINTR.
fn install_handler() -> Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe (it does nothing).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = ignore_signal as *const () as usize;
        action.sa_flags = 0;
        // SAFETY: `action` is fully initialised and outlives the call.
        if unsafe { libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) } != 0 {
            result = Err(Error::Watchdog(std::io::Error::last_os_error()));
        }
    });
    result
}

impl Watchdog {
    /// Starts the watchdog thread.
    pub fn new() -> Result<Self> {
        install_handler()?;
        let shared = Arc::new(Shared {
            deadline_ns: AtomicU64::new(DISARMED),
            target: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            epoch: Instant::now(),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("nmifuzz-watchdog".into())
            .spawn(move || watch(&thread_shared))
            .map_err(Error::Watchdog)?;
        Ok(Self { shared, thread: Some(thread) })
    }

    /// Arms the watchdog for the calling thread: it is kicked from `limit` from now on.
    pub fn arm(&self, limit: Duration) -> Instant {
        let deadline = Instant::now() + limit;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.shared.target.store(me as u64, Ordering::Relaxed);
        let ns = deadline.duration_since(self.shared.epoch).as_nanos() as u64;
        self.shared.deadline_ns.store(ns, Ordering::Release);
        deadline
    }

    /// Stops the kicks.
    pub fn disarm(&self) {
        self.shared.deadline_ns.store(DISARMED, Ordering::Release);
    }
}

fn watch(shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) {
        std::thread::sleep(TICK);
        let deadline = shared.deadline_ns.load(Ordering::Acquire);
        let now = shared.epoch.elapsed().as_nanos() as u64;
        if deadline != DISARMED && now >= deadline {
            let target = shared.target.load(Ordering::Relaxed) as libc::pthread_t;
            // SAFETY: `target` is the thread that armed us; it owns the `Watchdog` and joins this
            // thread before it can exit, so the pthread_t is still valid.
            unsafe { libc::pthread_kill(target, kick_signal()) };
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
