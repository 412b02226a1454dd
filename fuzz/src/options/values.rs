//! The values of command-line options: the choices of `sweep`, and the values clap cannot parse
//! by itself, with their parsers (each error says what was wrong and what would be valid, and
//! clap names the flag).

use std::net::{SocketAddr, ToSocketAddrs};

use nmifuzz_abi::Variant;
use vmm::engine::schedule::{Fault, variant_names};

/// The `--third-window` of `nmifuzz sweep`: where the loop sweep puts a third NMI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThirdWindow {
    /// `N` instructions after a nested second NMI and after each IRETQ that follows it.
    Within(u64),
    /// Every instruction from the second NMI until the first NMI's handling ends.
    All,
}

impl std::fmt::Display for ThirdWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Within(n) => write!(f, "{n}"),
            Self::All => f.write_str("all"),
        }
    }
}

/// The largest numeric `--third-window`: past a few hundred instructions, `all` is the bound.
const MAX_THIRD_WINDOW: u64 = 1000;

/// Parses `--third-window`: a number of instructions (0 to 1000) or `all`.
pub fn parse_third_window(text: &str) -> Result<ThirdWindow, String> {
    match text {
        "all" => Ok(ThirdWindow::All),
        number => match number.parse::<u64>() {
            Ok(n) if n <= MAX_THIRD_WINDOW => Ok(ThirdWindow::Within(n)),
            _ => Err(format!(
                "`{text}` is neither a number of instructions (0 to {MAX_THIRD_WINDOW}) nor `all`"
            )),
        },
    }
}

/// The `--user-pairs` of `nmifuzz sweep`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UserPairs {
    /// Second NMIs after first NMIs at the ring-3 points and in both SYSCALL gaps.
    Gaps,
    /// Second NMIs after first NMIs at the ring-3 points only.
    Ring3,
}

/// The `--workload` of `nmifuzz sweep`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SweepWorkload {
    /// The loop sweep: nested NMIs over the ring-0 workload loop.
    Loop,
    /// The user sweep: NMIs around ring 3.
    User,
    /// Both, the loop's first.
    Both,
}

/// The faults a campaign may use.
#[derive(Clone, Debug)]
pub struct FaultList(pub Vec<Fault>);

/// Parses `all`, `none` or a comma-separated list of fault names.
pub fn parse_faults(text: &str) -> Result<FaultList, String> {
    let valid = || {
        Fault::ALL
            .iter()
            .map(|f| serde_json::to_string(f).unwrap().replace('"', ""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match text {
        "all" => Ok(FaultList(Fault::ALL.to_vec())),
        "none" => Ok(FaultList(Vec::new())),
        list => list
            .split(',')
            .map(|name| {
                serde_json::from_value::<Fault>(serde_json::Value::String(name.trim().to_owned()))
                    .map_err(|_| {
                        format!("unknown fault `{name}`; valid faults: {}, or all, none", valid())
                    })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(FaultList),
    }
}

/// The cores of `--cores`.
#[derive(Clone, Debug)]
pub struct CoreList(pub Vec<usize>);

/// Parses `--cores`: a count N means cores 0..N-1; `0,2`, `0-3` and `all` are core lists.
pub fn parse_cores(text: &str) -> Result<CoreList, String> {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ids: Vec<usize> = if text == "all" {
        (0..available).collect()
    } else if let Ok(count) = text.parse::<usize>() {
        if count == 0 {
            return Err("at least one core is needed".into());
        }
        (0..count).collect()
    } else {
        let mut ids = Vec::new();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let bad = || format!("`{part}` is not a core number or range (e.g. 0,1 or 0-3)");
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (
                        a.parse::<usize>().map_err(|_| bad())?,
                        b.parse::<usize>().map_err(|_| bad())?,
                    );
                    if a > b {
                        return Err(bad());
                    }
                    ids.extend(a..=b);
                }
                None => ids.push(part.parse().map_err(|_| bad())?),
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    if ids.is_empty() {
        return Err("no cores given".into());
    }
    if let Some(bad) = ids.iter().find(|&&id| id >= available) {
        return Err(format!(
            "core {bad} does not exist: this machine has cores 0-{}",
            available - 1
        ));
    }
    Ok(CoreList(ids))
}

/// Parses `HOST:PORT`, resolving the host name.
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.to_socket_addrs()
        .map_err(|e| format!("`{text}` is not HOST:PORT: {e}"))?
        .next()
        .ok_or_else(|| format!("`{text}` resolves to no address"))
}

/// Accepts a variant name, or explains which names are valid.
pub fn parse_variant(name: &str) -> Result<String, String> {
    match Variant::from_name(name) {
        Some(_) => Ok(name.to_owned()),
        None => Err(format!("unknown variant `{name}`; valid variants: {}", variant_names())),
    }
}
