//! Progress bars for long work (sweep, eval) that also work in logs: on a terminal a bar with
//! notes printed above it; elsewhere (CI logs, pipes) no bar, and the notes plus a periodic
//! "N/M" line on stderr.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a log line reports progress when there is no terminal.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// A progress bar over `length` items of `unit`s (`runs`, ...).
pub struct Progress {
    bar: ProgressBar,
    /// Report at all (false: quiet, e.g. `--json` or a child job).
    shown: bool,
    terminal: bool,
    unit: &'static str,
    last_log: std::sync::Mutex<Instant>,
}

impl Progress {
    /// Progress on stderr if `shown`: a bar on a terminal, log lines elsewhere.
    pub fn new(length: u64, unit: &'static str, shown: bool) -> Self {
        let terminal = shown && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = ProgressBar::new(length).with_style(
            ProgressStyle::with_template(&format!(
                "{{elapsed_precise}} [{{wide_bar}}] {{pos}}/{{len}} {unit} ({{eta}} left) {{msg}}"
            ))
            .expect("a valid template"),
        );
        if !terminal {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        Self { bar, shown, terminal, unit, last_log: std::sync::Mutex::new(Instant::now()) }
    }

    /// A note for the user, above the bar or as a log line.
    pub fn note(&self, text: &str) {
        if self.terminal {
            self.bar.println(text);
        } else if self.shown {
            eprintln!("{text}");
        }
    }

    /// `n` more items done.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        if self.shown && !self.terminal {
            let mut last = self.last_log.lock().expect("not poisoned");
            if last.elapsed() >= LOG_EVERY {
                *last = Instant::now();
                eprintln!(
                    "progress: {}/{} {}",
                    self.bar.position(),
                    self.bar.length().unwrap_or(0),
                    self.unit
                );
            }
        }
    }

    /// `n` more items to do.
    pub fn inc_length(&self, n: u64) {
        self.bar.inc_length(n);
    }

    /// The bar's message.
    pub fn set_message(&self, text: String) {
        self.bar.set_message(text);
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
