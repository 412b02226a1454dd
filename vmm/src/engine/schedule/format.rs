//! The schedule's types, as they are on disk (JSON) and inside LibAFL (postcard).

use nmifuzz_abi::fault;
use serde::{Deserialize, Serialize};

use super::Origin;

/// The current schedule format; files with another one are refused.
pub const SCHEDULE_FORMAT: u32 = 1;

/// A schedule, as written on disk.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// [`SCHEDULE_FORMAT`].
    pub format: u32,
    /// What the schedule shows, for people.
    #[serde(default)]
    pub description: String,
    /// The NMI entry variant (`nmifuzz variants` lists them).
    pub variant: String,
    /// Iterations of the workload loop the NMIs interrupt (0: the guest's default).
    #[serde(default)]
    pub workload_iterations: u32,
    /// The `linux`-derived entries' stress mode (`nmifuzz_abi::option::STRESS_UNMASK`): NMIs
    /// unmasked right after `first_nmi`, as Linux's CONFIG_DEBUG_ENTRY does.
    #[serde(default)]
    pub stress_unmask: bool,
    /// `actions[i]` is what the i-th `do_nmi` call does; later calls return at once.
    #[serde(default)]
    pub actions: Vec<HandlerAction>,
    /// The NMIs, in order.
    pub injections: Vec<Injection>,
    /// Where the schedule came from, recorded in artifacts.
    #[serde(default)]
    pub origin: Option<Origin>,
}

/// What one `do_nmi` call does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerAction {
    /// Iterations of busy work.
    #[serde(default)]
    pub busy: u32,
    /// Exceptions raised after the busy work, in this order.
    #[serde(default)]
    pub faults: Vec<Fault>,
}

/// An exception `do_nmi` raises on purpose; its IRETQ re-opens NMIs inside the handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// `ud2`: #UD on the current stack.
    Ud,
    /// A write to a demand-mapped page: #PF on the current stack, which maps it.
    Pf,
    /// `int3`: #BP, on the current stack while `do_nmi` runs.
    Bp,
}

impl Fault {
    /// Every fault, in the order `do_nmi` raises them.
    pub const ALL: &'static [Fault] = &[Fault::Ud, Fault::Pf, Fault::Bp];

    pub(super) fn bit(self) -> u32 {
        match self {
            Self::Ud => fault::UD,
            Self::Pf => fault::PF,
            Self::Bp => fault::BP,
        }
    }
}

/// When one NMI arrives.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Injection {
    /// This many guest instructions after the previous injection (the first: after the start
    /// of the run). 0 means at the same boundary as the previous one.
    After(u64),
    /// At a symbolic point of the guest code.
    At(Point),
}

/// A place in the guest code, reached for the n-th time, plus a few instructions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Point {
    /// A guest symbol.
    pub symbol: String,
    /// Bytes into the symbol.
    #[serde(default)]
    pub offset: u64,
    /// Which time the address is reached, counting from 1 (from the previous injection).
    #[serde(default = "first")]
    pub occurrence: u32,
    /// Instructions to run after reaching it before the NMI arrives.
    #[serde(default)]
    pub extra: u64,
}

fn first() -> u32 {
    1
}

impl Schedule {
    /// Pretty JSON, as written to disk.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("schedules always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::schedule::test_support::{MINIMAL, parse};

    #[test]
    fn minimal_schedule_parses_with_defaults() {
        let s = parse(MINIMAL).unwrap();
        assert_eq!(s.injections, vec![Injection::After(5)]);
        assert!(s.actions.is_empty() && s.origin.is_none() && s.description.is_empty());
    }

    #[test]
    fn round_trips_through_json() {
        let mut s = parse(MINIMAL).unwrap();
        s.actions.push(HandlerAction { busy: 3, faults: vec![Fault::Ud] });
        s.injections.push(Injection::At(Point {
            symbol: "do_nmi".into(),
            offset: 4,
            occurrence: 2,
            extra: 1,
        }));
        assert_eq!(parse(&s.to_json()).unwrap(), s);
    }

    #[test]
    fn fault_all_lists_every_fault_of_the_format() {
        use serde::de::value::{Error, U32Deserializer};
        // Serde numbers the variants 0, 1, ...: every index that deserializes is a fault, so a
        // fault added to the enum but not to `Fault::ALL` (and so never fuzzed) fails here.
        let by_index: Vec<Fault> = (0u32..)
            .map_while(|index| Fault::deserialize(U32Deserializer::<Error>::new(index)).ok())
            .collect();
        assert_eq!(by_index, Fault::ALL);
        assert!(Fault::ALL.contains(&Fault::Ud));
        let names: Vec<String> =
            Fault::ALL.iter().map(|f| serde_json::to_string(f).unwrap()).collect();
        let mut unique = names.clone();
        unique.dedup();
        assert_eq!(unique, names);
    }
}
