//! The objective: one artifact per distinct finding.
//!
//! A finding's identity, its *key*, is [`Verdict::signature`], the one finding identity of the
//! project (the sweep, eval and tmin use it too): the same bug reached with other counts,
//! addresses or instruction budgets has the same key, while another verdict kind, panic
//! message and location, or IRETQ and differing fields has another. The artifact's file
//! name carries a hash of the key, so a finding already saved, by this client, another client
//! or an earlier campaign on the same artifacts directory, is not saved again.

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::PathBuf;

use libafl::corpus::Testcase;
use libafl::executors::ExitKind;
use libafl::feedbacks::{Feedback, StateInitializer};
use libafl::observers::Observer;
use libafl::{Error, HasMetadata, SerdeAny};
use libafl_bolts::Named;
use libafl_bolts::tuples::{Handle, Handled, MatchName, MatchNameRef};
use serde::{Deserialize, Serialize};
use vmm::Verdict;

use crate::store;

/// The verdict of the last execution, for the objective. Observers travel through LibAFL's
/// events and restarts, so this is plain serde data.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerdictObserver {
    name: Cow<'static, str>,
    /// [`Verdict::kind`]; `pass` for no finding.
    pub kind: String,
    /// The verdict as text.
    pub message: String,
    /// [`Verdict::signature`]: the finding's identity.
    pub signature: String,
}

impl VerdictObserver {
    /// An observer named `verdict`.
    pub fn new() -> Self {
        Self {
            name: Cow::Borrowed("verdict"),
            kind: "pass".into(),
            message: String::new(),
            signature: String::new(),
        }
    }

    /// Records `verdict`.
    pub fn set(&mut self, verdict: &Verdict) {
        self.kind = verdict.kind().to_owned();
        self.message = verdict.to_string();
        self.signature = verdict.signature();
    }

    /// Whether the last execution ended in a finding.
    pub fn is_finding(&self) -> bool {
        self.kind != "pass"
    }
}

impl Named for VerdictObserver {
    fn name(&self) -> &Cow<'static, str> {
        &self.name
    }
}

impl<I, S> Observer<I, S> for VerdictObserver {
    fn pre_exec(&mut self, _state: &mut S, _input: &I) -> Result<(), Error> {
        self.kind = "pass".into();
        self.message.clear();
        self.signature.clear();
        Ok(())
    }
}

/// What an artifact's testcase records about its finding; the artifacts corpus names the
/// file from it.
#[derive(Clone, Debug, Serialize, Deserialize, SerdeAny)]
pub struct FindingMetadata {
    /// [`Verdict::kind`].
    pub kind: String,
    /// The verdict as text.
    pub message: String,
    /// [`Verdict::signature`].
    pub key: String,
}

/// The objective: interesting when the verdict is a finding whose key has no artifact yet.
pub struct VerdictFeedback {
    observer: Handle<VerdictObserver>,
    artifacts: PathBuf,
    saved: HashSet<String>,
    last: Option<FindingMetadata>,
}

impl VerdictFeedback {
    /// An objective reading `observer` and checking for existing artifacts in `artifacts`.
    pub fn new(observer: &VerdictObserver, artifacts: PathBuf) -> Self {
        Self { observer: observer.handle(), artifacts, saved: HashSet::new(), last: None }
    }

    /// Whether `key` is new: not seen by this feedback and without an artifact on disk.
    fn is_new(&mut self, kind: &str, key: &str) -> bool {
        if self.saved.contains(key) {
            return false;
        }
        if self.artifacts.join(store::artifact_name(kind, key)).exists() {
            self.saved.insert(key.to_owned());
            return false;
        }
        true
    }
}

impl Named for VerdictFeedback {
    fn name(&self) -> &Cow<'static, str> {
        static NAME: Cow<'static, str> = Cow::Borrowed("VerdictFeedback");
        &NAME
    }
}

impl<S> StateInitializer<S> for VerdictFeedback {}

impl<EM, I, OT: MatchName, S> Feedback<EM, I, OT, S> for VerdictFeedback {
    fn is_interesting(
        &mut self,
        _state: &mut S,
        _manager: &mut EM,
        _input: &I,
        observers: &OT,
        _exit_kind: &ExitKind,
    ) -> Result<bool, Error> {
        let verdict = observers
            .get(&self.observer)
            .ok_or_else(|| Error::illegal_state("the verdict observer is missing"))?;
        self.last = None;
        if !verdict.is_finding() {
            return Ok(false);
        }
        let key = verdict.signature.clone();
        if !self.is_new(&verdict.kind, &key) {
            return Ok(false);
        }
        self.saved.insert(key.clone());
        self.last = Some(FindingMetadata {
            kind: verdict.kind.clone(),
            message: verdict.message.clone(),
            key,
        });
        Ok(true)
    }

    fn append_metadata(
        &mut self,
        _state: &mut S,
        _manager: &mut EM,
        _observers: &OT,
        testcase: &mut Testcase<I>,
    ) -> Result<(), Error> {
        if let Some(finding) = self.last.take() {
            testcase.add_metadata(finding);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use libafl_bolts::tuples::tuple_list;
    use vmm::GuestPanic;

    use super::*;

    fn panic_at(message: &str, line: u32, symbol: &str) -> Verdict {
        Verdict::GuestPanic(GuestPanic {
            message: message.into(),
            file: "guest/src/nmi.rs".into(),
            line,
            column: 9,
            rip: 0xffff_8000_0000_1234,
            symbol: symbol.into(),
        })
    }

    fn key(v: &Verdict) -> String {
        v.signature()
    }

    #[test]
    fn the_key_is_the_verdict_signature() {
        let a = panic_at("NMI stack overwritten at 0x1000", 10, "do_nmi+0x1a");
        let b = panic_at("NMI stack overwritten at 0x2008", 10, "do_nmi+0x22");
        assert_eq!(key(&a), key(&b), "numbers and the RIP are no part of the identity");
        assert_eq!(key(&a), a.signature());
        let mut observer = VerdictObserver::new();
        observer.set(&a);
        assert_eq!(observer.signature, a.signature());
        assert_ne!(key(&a), key(&panic_at("IST guard word clobbered", 10, "do_nmi+0x1a")));
        assert_ne!(key(&a), key(&panic_at("NMI stack overwritten", 11, "do_nmi+0x1a")));
        let budget =
            |n, symbol: &str| Verdict::InstructionBudget { instructions: n, symbol: symbol.into() };
        assert_eq!(key(&budget(20_000, "nmi_naive+0x32")), key(&budget(30_000, "nmi_naive+0x40")));
        assert_ne!(key(&budget(20_000, "nmi_naive+0x32")), key(&a));
        assert_ne!(
            key(&Verdict::TripleFault { rip: 1, symbol: "nmi_naive+0x3".into() }),
            key(&budget(20_000, "nmi_naive+0x3"))
        );
    }

    #[test]
    fn objective_saves_each_key_once_and_respects_existing_artifacts() {
        let dir = std::env::temp_dir().join(format!("nmifuzz-feedback-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut observer = VerdictObserver::new();
        let mut feedback = VerdictFeedback::new(&observer, dir.clone());
        let mut interesting = |observer: &VerdictObserver| {
            let observers = tuple_list!(observer.clone());
            Feedback::<(), (), _, ()>::is_interesting(
                &mut feedback,
                &mut (),
                &mut (),
                &(),
                &observers,
                &ExitKind::Crash,
            )
            .unwrap()
        };
        assert!(!interesting(&observer), "a pass is no finding");
        observer.set(&panic_at("boom", 1, "do_nmi+0x1"));
        assert!(interesting(&observer));
        observer.set(&panic_at("boom", 1, "do_nmi+0x9"));
        assert!(!interesting(&observer), "same key again");
        let budget =
            Verdict::InstructionBudget { instructions: 20_000, symbol: "nmi_naive+0x32".into() };
        std::fs::write(dir.join(store::artifact_name(budget.kind(), &key(&budget))), b"{}")
            .unwrap();
        observer.set(&budget);
        assert!(!interesting(&observer), "already saved by an earlier campaign");
        observer.set(&Verdict::TripleFault { rip: 1, symbol: "x".into() });
        assert!(interesting(&observer));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
