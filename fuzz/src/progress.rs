//! Progress of long commands (sweep, eval, cmin, tmin), the one helper they all use. On a
//! terminal: a bar with the rate and the time left (or, when the total is unknown, a spinner
//! with the count and the rate), and notes printed above it. Elsewhere (CI logs, pipes) no
//! bar: the notes, and every 30 s a plain "progress: N/M units" line, all on stderr.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a log line reports progress when there is no terminal.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// Progress over items of some `unit` (`runs`, `entries`, ...).
pub struct Progress {
    bar: ProgressBar,
    /// Report at all (false: quiet, e.g. `--json` or a child job).
    shown: bool,
    terminal: bool,
    /// Whether the total is known (a bar) or not (a counter).
    bounded: bool,
    unit: &'static str,
    last_log: Mutex<Instant>,
}

impl Progress {
    /// Progress towards `length` items (more may be added with [`Progress::inc_length`]), on
    /// stderr if `shown`.
    pub fn new(length: u64, unit: &'static str, shown: bool) -> Self {
        let template = format!(
            "{{elapsed_precise}} [{{wide_bar}}] {{pos}}/{{len}} {unit} ({{per_sec:1}}, {{eta}} \
             left) {{msg}}"
        );
        Self::with_template(ProgressBar::new(length), &template, unit, shown, true)
    }

    /// Progress of work whose total is not known in advance (`tmin` runs until nothing
    /// shrinks): a count and its rate.
    pub fn counter(unit: &'static str, shown: bool) -> Self {
        let template =
            format!("{{elapsed_precise}} {{spinner}} {{pos}} {unit} ({{per_sec:1}}) {{msg}}");
        Self::with_template(ProgressBar::no_length(), &template, unit, shown, false)
    }

    fn with_template(
        bar: ProgressBar,
        template: &str,
        unit: &'static str,
        shown: bool,
        bounded: bool,
    ) -> Self {
        let terminal = shown && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = bar.with_style(ProgressStyle::with_template(template).expect("a valid template"));
        if terminal {
            // A spinner only turns when it is told to; a bar redraws on every `inc`.
            bar.enable_steady_tick(Duration::from_millis(250));
        } else {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        Self { bar, shown, terminal, bounded, unit, last_log: Mutex::new(Instant::now()) }
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
                eprintln!("progress: {} {}", self.position(), self.unit);
            }
        }
    }

    /// "N/M" for a bar, "N" for a counter.
    fn position(&self) -> String {
        if self.bounded {
            format!("{}/{}", self.bar.position(), self.bar.length().unwrap_or(0))
        } else {
            self.bar.position().to_string()
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
