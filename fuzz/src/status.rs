//! libFuzzer-style status lines, printed by LibAFL's monitor (in the broker when several
//! clients run, so the numbers are for the whole campaign):
//!
//! ```text
//! #412 NEW cov: 57 corp: 9 exec/s: 81 crashes: 0
//! #1630 pulse cov: 61 corp: 12 exec/s: 79 crashes: 0 clients: 2
//! ```
//!
//! `#N` counts executions, `cov` the NMI-path edges covered (the best client), `corp` the
//! corpus entries (the largest client corpus), `crashes` the artifacts saved.

use std::time::{Duration, Instant};

use libafl::Error;
use libafl::monitors::Monitor;
use libafl::monitors::stats::ClientStatsManager;
use libafl_bolts::ClientId;

/// The monitor.
pub struct StatusMonitor {
    pulse_every: Duration,
    last_pulse: Instant,
}

impl StatusMonitor {
    /// A monitor printing `pulse` lines at most every `pulse_every`.
    pub fn new(pulse_every: Duration) -> Self {
        Self { pulse_every, last_pulse: Instant::now() }
    }
}

impl Monitor for StatusMonitor {
    fn display(
        &mut self,
        stats: &mut ClientStatsManager,
        event_msg: &str,
        _sender_id: ClientId,
    ) -> Result<(), Error> {
        let tag = match event_msg {
            "Testcase" => "NEW",
            "Client Heartbeat" if self.last_pulse.elapsed() >= self.pulse_every => {
                self.last_pulse = Instant::now();
                "pulse"
            }
            _ => return Ok(()),
        };
        let cov = stats.edges_coverage().map_or(0, |c| c.edges_hit);
        let corpus = stats.client_stats().values().map(|c| c.corpus_size()).max().unwrap_or(0);
        let global = stats.global_stats();
        let mut line = format!(
            "#{} {tag} cov: {cov} corp: {corpus} exec/s: {:.0} crashes: {}",
            global.total_execs, global.execs_per_sec, global.objective_size
        );
        if tag == "pulse" && global.client_stats_count > 1 {
            line.push_str(&format!(" clients: {}", global.client_stats_count));
        }
        println!("{line}");
        Ok(())
    }
}
