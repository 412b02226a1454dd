//! The schedule's types, as they are on disk (JSON) and inside LibAFL (postcard).

use nmifuzz_abi::{fault, user_flag};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};

use super::Origin;

/// The current schedule format; files with another one are refused.
pub const SCHEDULE_FORMAT: u32 = 1;

/// A schedule, as written on disk.
///
/// Serialized field by field in this order (see the `Serialize` impl below): JSON leaves out
/// `workload` and `user_flags` when they are the default, so every schedule written before the
/// fields existed keeps its bytes and its content hash; postcard always writes every field.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// [`SCHEDULE_FORMAT`].
    pub format: u32,
    /// What the schedule shows, for people.
    #[serde(default)]
    pub description: String,
    /// The NMI entry variant (`nmifuzz variants` lists them).
    pub variant: String,
    /// The code the NMIs interrupt; absent means [`Workload::Loop`].
    #[serde(default)]
    pub workload: Workload,
    /// Iterations of the workload the NMIs interrupt (0: the guest's default).
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
    /// The RFLAGS bits the user workload sets before each of its system calls and ring-3
    /// points, in turn, starting over after the last (at most
    /// `nmifuzz_abi::USER_FLAG_SLOTS` sets); empty: none, as before the field existed. Only the
    /// user workload reads it.
    #[serde(default)]
    pub user_flags: Vec<Vec<UserFlag>>,
    /// Where the schedule came from, recorded in artifacts.
    #[serde(default)]
    pub origin: Option<Origin>,
}

impl Serialize for Schedule {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Only a human-readable format (JSON) may leave a field out: postcard, which LibAFL
        // uses, reads a struct as all of its fields in order (libafl-notes: no
        // `skip_serializing_if`).
        let human = serializer.is_human_readable();
        let omit_workload = human && self.workload == Workload::Loop;
        let omit_flags = human && self.user_flags.is_empty();
        let fields = 10 - usize::from(omit_workload) - usize::from(omit_flags);
        let mut s = serializer.serialize_struct("Schedule", fields)?;
        s.serialize_field("format", &self.format)?;
        s.serialize_field("description", &self.description)?;
        s.serialize_field("variant", &self.variant)?;
        if omit_workload {
            s.skip_field("workload")?;
        } else {
            s.serialize_field("workload", &self.workload)?;
        }
        s.serialize_field("workload_iterations", &self.workload_iterations)?;
        s.serialize_field("stress_unmask", &self.stress_unmask)?;
        s.serialize_field("actions", &self.actions)?;
        s.serialize_field("injections", &self.injections)?;
        if omit_flags {
            s.skip_field("user_flags")?;
        } else {
            s.serialize_field("user_flags", &self.user_flags)?;
        }
        s.serialize_field("origin", &self.origin)?;
        s.end()
    }
}

/// The code the NMIs interrupt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// The ring-0 loop that checks every register it can (`nmifuzz_abi::Workload::Loop`).
    #[default]
    Loop,
    /// The ring-3 workload (`nmifuzz_abi::Workload::User`): system calls (one with RSP on the
    /// NMI stack), returns to user through espfix64 and through a faulting IRET, and ring-3
    /// points (`out` to `port::USER`) where NMIs can strike user code.
    User,
}

impl Workload {
    /// Every workload, the default first.
    pub const ALL: &'static [Workload] = &[Workload::Loop, Workload::User];

    /// The name schedules use (`"loop"`, `"user"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Loop => "loop",
            Self::User => "user",
        }
    }

    /// The guest's workload.
    pub fn abi(self) -> nmifuzz_abi::Workload {
        match self {
            Self::Loop => nmifuzz_abi::Workload::Loop,
            Self::User => nmifuzz_abi::Workload::User,
        }
    }
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

/// What `do_nmi` does on purpose besides its busy work: an exception whose IRETQ re-opens NMIs
/// inside the handler, or the revoked user code segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// `ud2`: #UD on the current stack.
    Ud,
    /// A write to a demand-mapped page: #PF on the current stack, which maps it.
    Pf,
    /// `int3`: #BP, on the current stack while `do_nmi` runs.
    Bp,
    /// If the NMI interrupted ring 3 on the user workload's alternate code segment, mark that
    /// descriptor not-present, as another CPU's `modify_ldt` would: the NMI's return to user
    /// faults (CVE-2015-5157). `do_nmi` does it first, before the busy work; with any other
    /// interrupted context (the loop workload, ring 0) it does nothing.
    RevokeCs,
}

impl Fault {
    /// Every fault, in declaration order (`do_nmi` raises the exceptions in this order, after
    /// revoking the code segment).
    pub const ALL: &'static [Fault] = &[Fault::Ud, Fault::Pf, Fault::Bp, Fault::RevokeCs];
    /// The exceptions (`nmifuzz_abi::fault::ENTRY_FAULTS`): what re-opens NMIs inside `do_nmi`
    /// whatever the NMI interrupted.
    pub const EXCEPTIONS: &'static [Fault] = &[Fault::Ud, Fault::Pf, Fault::Bp];

    /// The name schedules use (`"ud"`, `"revoke-cs"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ud => "ud",
            Self::Pf => "pf",
            Self::Bp => "bp",
            Self::RevokeCs => "revoke-cs",
        }
    }

    pub(super) fn bit(self) -> u32 {
        match self {
            Self::Ud => fault::UD,
            Self::Pf => fault::PF,
            Self::Bp => fault::BP,
            Self::RevokeCs => fault::REVOKE_CS,
        }
    }
}

/// An RFLAGS bit the user workload sets before a system call or a ring-3 point
/// (`nmifuzz_abi::user_flag`): the arithmetic flags, which every return to ring 3 must give
/// back, and DF, AC and NT, which SYSCALL's SFMASK and the entries must not let into the
/// kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UserFlag {
    /// Carry.
    Cf,
    /// Parity.
    Pf,
    /// Auxiliary carry.
    Af,
    /// Zero.
    Zf,
    /// Sign.
    Sf,
    /// Direction.
    Df,
    /// Overflow.
    Of,
    /// Nested task.
    Nt,
    /// Alignment check.
    Ac,
}

impl UserFlag {
    /// Every flag, in declaration order.
    pub const ALL: &'static [UserFlag] = &[
        UserFlag::Cf,
        UserFlag::Pf,
        UserFlag::Af,
        UserFlag::Zf,
        UserFlag::Sf,
        UserFlag::Df,
        UserFlag::Of,
        UserFlag::Nt,
        UserFlag::Ac,
    ];

    /// Its RFLAGS bit.
    pub fn bit(self) -> u32 {
        match self {
            Self::Cf => user_flag::CF,
            Self::Pf => user_flag::PF,
            Self::Af => user_flag::AF,
            Self::Zf => user_flag::ZF,
            Self::Sf => user_flag::SF,
            Self::Df => user_flag::DF,
            Self::Of => user_flag::OF,
            Self::Nt => user_flag::NT,
            Self::Ac => user_flag::AC,
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

    /// Every variant of a unit enum, in declaration order: serde numbers the variants 0, 1, ...,
    /// and every index that deserializes is one, so a variant added to the enum but not to its
    /// `ALL` list (and so never fuzzed) makes the `ALL` tests below fail.
    fn by_serde_index<T: serde::de::DeserializeOwned>() -> Vec<T> {
        use serde::de::value::{Error, U32Deserializer};
        (0u32..)
            .map_while(|index| T::deserialize(U32Deserializer::<Error>::new(index)).ok())
            .collect()
    }

    #[test]
    fn fault_all_lists_every_fault_of_the_format() {
        assert_eq!(by_serde_index::<Fault>(), Fault::ALL);
        assert!(Fault::ALL.contains(&Fault::Ud));
        let names: Vec<String> =
            Fault::ALL.iter().map(|f| serde_json::to_string(f).unwrap()).collect();
        let mut unique = names.clone();
        unique.dedup();
        assert_eq!(unique, names);
        for f in Fault::ALL {
            assert_eq!(serde_json::to_string(f).unwrap(), format!("\"{}\"", f.name()));
        }
        assert_eq!(Fault::ALL.iter().fold(0, |bits, f| bits | f.bit()), fault::FUZZED);
        assert_eq!(Fault::EXCEPTIONS.iter().fold(0, |bits, f| bits | f.bit()), fault::ENTRY_FAULTS);
        assert_eq!(serde_json::to_string(&Fault::RevokeCs).unwrap(), r#""revoke-cs""#);
    }

    #[test]
    fn user_flag_all_lists_every_flag_of_the_format() {
        assert_eq!(by_serde_index::<UserFlag>(), UserFlag::ALL);
        assert_eq!(UserFlag::ALL.iter().fold(0, |bits, f| bits | f.bit()), user_flag::ALL);
        assert_eq!(serde_json::to_string(&UserFlag::Df).unwrap(), r#""df""#);
    }

    #[test]
    fn workload_all_lists_every_workload_of_the_format() {
        use serde::de::value::{Error, U32Deserializer};
        let by_index: Vec<Workload> = (0u32..)
            .map_while(|index| Workload::deserialize(U32Deserializer::<Error>::new(index)).ok())
            .collect();
        assert_eq!(by_index, Workload::ALL);
        assert_eq!(Workload::ALL[0], Workload::default());
        for w in Workload::ALL {
            assert_eq!(serde_json::to_string(w).unwrap(), format!("\"{}\"", w.name()));
        }
    }

    #[test]
    fn the_default_workload_leaves_the_json_as_it_was() {
        let s = parse(MINIMAL).unwrap();
        assert_eq!(s.workload, Workload::Loop, "a file without the field means the loop");
        // Exactly what this schedule serialized to before the field existed, so content hashes
        // (corpus file names) of every loop schedule stay the same.
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"format":1,"description":"","variant":"naive","workload_iterations":0,"stress_unmask":false,"actions":[],"injections":[{"after":5}],"origin":null}"#
        );
        let flagged =
            Schedule { user_flags: vec![vec![UserFlag::Df, UserFlag::Ac], vec![]], ..s.clone() };
        assert!(flagged.to_json().contains(r#""user_flags": ["#), "{}", flagged.to_json());
        assert_eq!(parse(&flagged.to_json()).unwrap(), flagged);
        let user = Schedule { workload: Workload::User, ..s };
        let json = user.to_json();
        assert!(
            json.contains(
                r#""variant": "naive",
  "workload": "user","#
            ),
            "{json}"
        );
        assert_eq!(parse(&json).unwrap(), user);
        let explicit = MINIMAL.replace(r#""variant""#, r#""workload": "loop", "variant""#);
        assert_eq!(parse(&explicit).unwrap().workload, Workload::Loop);
        let err = parse(&MINIMAL.replace(r#""variant""#, r#""workload": "ring3", "variant""#));
        assert!(err.unwrap_err().contains("unknown variant `ring3`, expected `loop` or `user`"));
    }
}
