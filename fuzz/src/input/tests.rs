//! The generator's and the mutators' tests, on small instruction tables.

use std::path::Path;
use std::sync::Arc;

use libafl::corpus::{Corpus, InMemoryCorpus, Testcase};
use libafl::inputs::Input;
use libafl::mutators::{HavocScheduledMutator, MutationResult, Mutator};
use libafl::state::{HasCorpus, HasRand, StdState};
use libafl_bolts::rands::StdRand;
use vmm::engine::schedule::{Fault, Injection, Schedule, Workload};
use vmm::engine::table::{InstructionTable, TableInsn};

use super::*;
use crate::nmi_mutations;
use crate::points::{JumpPoint, Points, ShiftOccurrence, StepPoint, ToggleExtra, ToggleStress};
use crate::points::{MAX_EXTRA, Table};
use crate::ring3::Region;

type TestState = StdState<InMemoryCorpus<NmiInput>, NmiInput, StdRand, InMemoryCorpus<NmiInput>>;

fn insn(symbol: &str, base: u64, offset: u64) -> TableInsn {
    TableInsn { symbol: symbol.into(), offset, address: base + offset }
}

/// A small table without the user workload: a workload loop of 6 instructions and a
/// handler of 4.
fn loop_table() -> Table {
    let mut insns: Vec<TableInsn> = (0..6).map(|i| insn("workload_loop", 0x1000, 2 * i)).collect();
    insns.extend((0..4).map(|i| insn("do_nmi", 0x2000, 3 * i)));
    Arc::new(Points::new(InstructionTable::from_insns(insns), Vec::new()))
}

/// The same with the user workload: 3 ring-3 points, a SYSCALL gap of 3 instructions and
/// an entry's user path of 2 (where no first NMI can go).
fn table() -> Table {
    let base = loop_table();
    let mut ring3: Vec<(TableInsn, Region)> = (0..3)
        .map(|i| (insn(&format!("user_point_{i}"), 0x400_000 + 16 * i, 2), Region::UserPoint))
        .collect();
    ring3.extend((0..3).map(|i| (insn("entry_SYSCALL_64", 0x3000, 3 * i), Region::SyscallGap)));
    ring3.extend((0..2).map(|i| (insn("nmi_naive_from_user", 0x5000, i), Region::NmiUserPath)));
    Arc::new(Points::new(InstructionTable::from_insns(base.insns().to_vec()), ring3))
}

fn generator(faults: &[Fault]) -> ScheduleGenerator {
    ScheduleGenerator::new("naive", faults, &table())
}

fn state(seed: u64) -> TestState {
    StdState::new(
        StdRand::with_seed(seed),
        InMemoryCorpus::new(),
        InMemoryCorpus::new(),
        &mut (),
        &mut (),
    )
    .unwrap()
}

/// The fuzzer's own limits, on top of the schedule format's.
fn assert_within_limits(schedule: &Schedule) {
    schedule.validate().unwrap_or_else(|p| panic!("{p}: {schedule:?}"));
    assert_eq!(schedule.variant, "naive", "the variant changed");
    assert!(schedule.injections.len() <= FUZZER_MAX_INJECTIONS);
    assert!(schedule.actions.len() <= FUZZER_MAX_ACTIONS);
    for injection in &schedule.injections {
        match injection {
            Injection::After(n) => assert!(*n <= FUZZER_MAX_DELAY),
            Injection::At(p) => {
                assert!(p.extra <= MAX_EXTRA, "{p:?}");
                assert!((1..=crate::points::MAX_OCCURRENCE).contains(&p.occurrence));
                assert!(table().position(&p.symbol, p.offset).is_some(), "{p:?}");
            }
        }
    }
    for action in &schedule.actions {
        assert!(action.busy <= FUZZER_MAX_BUSY && action.faults.len() <= FUZZER_MAX_FAULTS);
    }
    assert_eq!(schedule.workload_iterations, generated_iterations(schedule.workload));
}

#[test]
fn generated_schedules_follow_the_documented_ranges() {
    let generator = generator(Fault::ALL);
    let mut rand = StdRand::with_seed(7);
    let (mut saw_faults, mut saw_stress, mut saw_extra, mut saw_handler) =
        (false, false, false, false);
    let (mut users, mut first_at_user_points, mut revoked) = (0, 0, false);
    for _ in 0..2_000 {
        let s = generator.schedule(&mut rand);
        assert_within_limits(&s);
        assert!((1..=4).contains(&s.injections.len()));
        assert_eq!(s.actions.len(), s.injections.len());
        saw_stress |= s.stress_unmask;
        users += usize::from(s.workload == Workload::User);
        for (k, injection) in s.injections.iter().enumerate() {
            let Injection::At(p) = injection else { panic!("not a point: {injection:?}") };
            assert!((1..=3).contains(&p.occurrence) && p.extra <= 2, "{p:?}");
            if k == 0 {
                // The first NMI strikes where the workload runs.
                match s.workload {
                    Workload::Loop => assert_eq!(p.symbol, "workload_loop"),
                    Workload::User => {
                        assert!(
                            p.symbol.starts_with("user_point_") || p.symbol == "entry_SYSCALL_64",
                            "{p:?}"
                        );
                        first_at_user_points += usize::from(p.symbol.starts_with("user_"));
                    }
                }
            }
            saw_extra |= p.extra > 0;
            saw_handler |= p.symbol == "do_nmi";
        }
        for action in &s.actions {
            assert!(action.busy <= GENERATED_BUSY && action.faults.len() <= 2);
            saw_faults |= !action.faults.is_empty();
            let revokes = action.faults.contains(&Fault::RevokeCs);
            assert!(!revokes || s.workload == Workload::User, "revoke-cs at ring 0: {s:?}");
            revoked |= revokes;
        }
    }
    assert!(saw_faults && saw_stress && saw_extra && saw_handler && revoked);
    assert!((900..1100).contains(&users), "{users} of 2000 user schedules");
    assert!(
        (users * 2 / 5..users * 3 / 5).contains(&first_at_user_points),
        "{first_at_user_points} of {users} user schedules begin at a ring-3 point"
    );
}

#[test]
fn without_the_user_workload_the_generator_draws_what_it_drew_before() {
    let (with, without) =
        (generator(Fault::ALL), ScheduleGenerator::new("naive", Fault::ALL, &loop_table()));
    let (mut a, mut b) = (StdRand::with_seed(9), StdRand::with_seed(9));
    for _ in 0..200 {
        let s = without.schedule(&mut a);
        assert_eq!((s.workload, s.workload_iterations), (Workload::Loop, 0));
        let Injection::At(first) = &s.injections[0] else { panic!("{s:?}") };
        assert_eq!(first.symbol, "workload_loop");
    }
    // With the user workload, the loop schedules are drawn as often as the user ones.
    let loops = (0..200).filter(|_| with.schedule(&mut b).workload == Workload::Loop).count();
    assert!((70..130).contains(&loops), "{loops}");
}

#[test]
fn toggling_the_workload_moves_the_first_nmi_where_the_new_workload_runs() {
    let mut state = state(13);
    let mut toggle = ToggleWorkload::new(&table());
    let generator = generator(Fault::ALL);
    for _ in 0..200 {
        let mut input = NmiInput(generator.schedule(state.rand_mut()));
        let before = input.0.workload;
        assert_eq!(toggle.mutate(&mut state, &mut input).unwrap(), MutationResult::Mutated);
        assert_ne!(input.0.workload, before);
        assert_within_limits(&input.0);
        let Injection::At(first) = &input.0.injections[0] else { panic!("{input:?}") };
        assert!(table().is_first(input.0.workload, &first.symbol, first.offset), "{first:?}");
    }
    let mut input = NmiInput(generator.schedule(state.rand_mut()));
    let mut without = ToggleWorkload::new(&loop_table());
    assert_eq!(without.mutate(&mut state, &mut input).unwrap(), MutationResult::Skipped);
}

#[test]
fn mutators_keep_the_variant_and_the_limits() {
    let mut state = state(3);
    let generator = generator(Fault::ALL);
    for _ in 0..4 {
        let seed = NmiInput(generator.schedule(state.rand_mut()));
        state.corpus_mut().add(Testcase::new(seed)).unwrap();
    }
    let mut havoc =
        HavocScheduledMutator::with_max_stack_pow(nmi_mutations!(Fault::ALL, &table()), 4);
    let mut input = NmiInput(generator.schedule(state.rand_mut()));
    let mut mutated = 0;
    for round in 0..5_000 {
        if round % 100 == 0 {
            input = NmiInput(generator.schedule(state.rand_mut()));
        }
        if havoc.mutate(&mut state, &mut input).unwrap() == MutationResult::Mutated {
            mutated += 1;
        }
        assert_within_limits(&input.0);
    }
    assert!(mutated > 4_000, "only {mutated} mutations took effect");
}

#[test]
fn each_mutator_changes_something_and_stays_valid() {
    let mut state = state(11);
    let generator = generator(Fault::ALL);
    for _ in 0..3 {
        let seed = NmiInput(generator.schedule(state.rand_mut()));
        state.corpus_mut().add(Testcase::new(seed)).unwrap();
    }
    fn check<M: Mutator<NmiInput, TestState>>(
        m: &mut M,
        state: &mut TestState,
        g: &ScheduleGenerator,
    ) {
        let mut changed = 0;
        for _ in 0..500 {
            let before = NmiInput(g.schedule(state.rand_mut()));
            let mut after = before.clone();
            if m.mutate(state, &mut after).unwrap() == MutationResult::Mutated {
                assert_ne!(before, after, "{} claimed a mutation", m.name());
                changed += 1;
            } else {
                assert_eq!(before, after, "{} changed a skipped input", m.name());
            }
            assert_within_limits(&after.0);
        }
        assert!(changed > 100, "{} mutated only {changed} of 500", m.name());
    }
    check(&mut InsertInjection::new(&table()), &mut state, &generator);
    check(&mut RemoveInjection, &mut state, &generator);
    check(&mut DuplicateInjection, &mut state, &generator);
    check(&mut ShiftDelaySmall, &mut state, &generator);
    check(&mut ShiftDelayLarge, &mut state, &generator);
    check(&mut ChangeBusy, &mut state, &generator);
    check(&mut ChangeFaults::new(Fault::ALL), &mut state, &generator);
    check(&mut InsertOrRemoveAction, &mut state, &generator);
    check(&mut SpliceSchedules, &mut state, &generator);
    check(&mut StepPoint::new(&table()), &mut state, &generator);
    check(&mut JumpPoint::new(&table()), &mut state, &generator);
    check(&mut ShiftOccurrence::new(&table()), &mut state, &generator);
    check(&mut ToggleExtra::new(&table()), &mut state, &generator);
    check(&mut ToggleStress, &mut state, &generator);
    check(&mut ToggleWorkload::new(&table()), &mut state, &generator);
}

#[test]
fn without_allowed_faults_no_fault_is_ever_added() {
    let mut state = state(5);
    let generator = generator(&[]);
    let mut havoc = HavocScheduledMutator::with_max_stack_pow(nmi_mutations!(&[], &table()), 4);
    let mut input = NmiInput(generator.schedule(state.rand_mut()));
    for _ in 0..2_000 {
        let _ = havoc.mutate(&mut state, &mut input).unwrap();
        assert!(input.0.actions.iter().all(|a| a.faults.is_empty()), "{input:?}");
    }
}

#[test]
fn input_round_trips_through_postcard_and_json() {
    let mut schedule = generator(Fault::ALL).schedule(&mut StdRand::with_seed(1));
    schedule.origin =
        Some(vmm::engine::schedule::Origin { guest_hash: "00".into(), host_profile: "p".into() });
    for workload in Workload::ALL {
        let input = NmiInput(Schedule { workload: *workload, ..schedule.clone() });
        let bytes = postcard::to_allocvec(&input).unwrap();
        assert_eq!(postcard::from_bytes::<NmiInput>(&bytes).unwrap(), input);
        let json = serde_json::to_string(&input).unwrap();
        assert_eq!(Schedule::from_json(json.as_bytes(), Path::new("x")).unwrap(), input.0);
    }
}

#[test]
fn inputs_saved_before_the_workload_gene_load_as_loop_schedules() {
    // The seeds of ./corpus, written before the gene, and their corpus names.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if std::fs::read_to_string(&path).unwrap().contains("\"workload\"") {
            continue; // written with the gene (the ring-3 reproducers)
        }
        let input = NmiInput::from_file(&path).unwrap();
        assert_eq!(input.0.workload, Workload::Loop);
        assert!(!serde_json::to_string(&input).unwrap().contains("workload\""));
        seen += 1;
    }
    assert!(seen >= 7);
}
