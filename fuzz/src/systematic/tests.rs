//! The systematic stage's neighbours and their order, over a made-up table (no VM needed).

use std::collections::HashSet;
use std::sync::Arc;

use libafl::corpus::{Corpus, InMemoryCorpus, Testcase};
use vmm::engine::schedule::{
    Fault, HandlerAction, Injection, Point, SCHEDULE_FORMAT, Schedule, Workload,
};
use vmm::engine::table::{InstructionTable, TableInsn};

use super::neighbours::{Kind, Neighbour};
use super::{Expansion, Neighbours};
use crate::input::NmiInput;
use crate::points::{Points, Table};
use crate::ring3::Region;

const ENTRY: &str = "nmi_test";
/// The entry: ten 2-byte instructions at 0x2000, IRETQs at the 7th and the 10th.
const ENTRY_IRETQS: [u64; 2] = [0x200c, 0x2012];
/// The return to user: four instructions at 0x6000, an IRETQ at the last.
const USER_IRETQ: u64 = 0x6006;

fn insn(symbol: &str, base: u64, offset: u64) -> TableInsn {
    TableInsn { symbol: symbol.to_owned(), offset, address: base + offset }
}

/// The workload loop, the entry, `do_nmi`, a ring-3 point and the return to user.
fn table() -> Table {
    let mut insns: Vec<TableInsn> = (0..3).map(|k| insn("workload_loop", 0x1000, 4 * k)).collect();
    insns.extend((0..10).map(|k| insn(ENTRY, 0x2000, 2 * k)));
    insns.extend((0..3).map(|k| insn("do_nmi", 0x3000, 4 * k)));
    let mut around_ring3 = vec![(insn("user_point_a", 0x5000, 7), Region::UserPoint)];
    around_ring3.extend(
        (0..4).map(|k| (insn("native_irq_return_ldt", 0x6000, 2 * k), Region::ReturnToUser)),
    );
    around_ring3.extend((0..2).map(|k| (insn("entry_SYSCALL_64", 0x7000, k), Region::SyscallGap)));
    around_ring3.push((insn("syscall_return_via_sysret", 0x7100, 0), Region::SysretGap));
    Arc::new(Points::new(InstructionTable::from_insns(insns), around_ring3))
}

fn neighbours() -> Neighbours {
    let iretqs: Vec<u64> = ENTRY_IRETQS.iter().copied().chain([USER_IRETQ]).collect();
    Neighbours::new(&table(), ENTRY, Fault::ALL, &iretqs)
}

fn at(symbol: &str, offset: u64, occurrence: u32) -> Injection {
    Injection::At(Point { symbol: symbol.to_owned(), offset, occurrence, extra: 0 })
}

fn schedule(workload: Workload, first: Injection, faults: &[Fault], stress: bool) -> Schedule {
    Schedule {
        format: SCHEDULE_FORMAT,
        description: String::new(),
        variant: "linux".to_owned(),
        workload,
        workload_iterations: 0,
        stress_unmask: stress,
        actions: vec![HandlerAction { busy: 3, faults: faults.to_vec() }],
        injections: vec![first],
        user_flags: Vec::new(),
        origin: None,
    }
}

/// The symbol, offset and occurrence of the last injection.
fn last(neighbour: &Neighbour) -> (String, u64, u32) {
    match neighbour.schedule.injections.last() {
        Some(Injection::At(p)) => (p.symbol.clone(), p.offset, p.occurrence),
        other => panic!("not a point: {other:?}"),
    }
}

#[test]
fn second_nmis_go_to_every_entry_instruction_nearest_an_iretq_first() {
    let base = schedule(Workload::Loop, at("workload_loop", 4, 1), &[Fault::Ud], false);
    let (now, later) = neighbours().of(&base, 0);
    // First the faults a ring-0 NMI can raise (not revoke-cs), the first NMI alone.
    let faults: Vec<&Neighbour> = now.iter().filter(|n| n.kind == Kind::Fault).collect();
    assert_eq!(faults.len(), Fault::EXCEPTIONS.len());
    for (neighbour, fault) in faults.iter().zip(Fault::EXCEPTIONS) {
        assert_eq!(neighbour.schedule.injections, base.injections);
        assert_eq!(neighbour.schedule.actions[0].faults, vec![*fault]);
    }
    // Then a second NMI at each of the entry's ten instructions, once each, by the distance
    // (in instructions) to the nearest IRETQ, the later first among equals.
    let nests: Vec<&Neighbour> = now.iter().filter(|n| n.kind != Kind::Fault).collect();
    let offsets: Vec<u64> = nests.iter().map(|n| last(n).1).collect();
    assert_eq!(offsets, [18, 12, 16, 14, 10, 8, 6, 4, 2, 0]);
    for (rank, nest) in nests.iter().enumerate() {
        assert_eq!(nest.kind, Kind::Nest { rank });
        assert_eq!(nest.priority, rank);
        assert_eq!(nest.schedule.injections[0], base.injections[0]);
        assert_eq!(nest.schedule.actions, base.actions);
        assert_eq!(last(nest), (ENTRY.to_owned(), offsets[rank], 1));
    }
    // The same at occurrence 2, kept apart.
    let again: Vec<(String, u64, u32)> = later.iter().map(last).collect();
    let expected: Vec<(String, u64, u32)> =
        offsets.iter().map(|&o| (ENTRY.to_owned(), o, 2)).collect();
    assert_eq!(again, expected);
}

#[test]
fn no_second_nmis_when_nothing_reopens_nmis() {
    // revoke-cs does nothing to an NMI that interrupted ring 0; no exception, no stress.
    for faults in [&[][..], &[Fault::RevokeCs]] {
        let base = schedule(Workload::Loop, at("workload_loop", 0, 1), faults, false);
        let (now, later) = neighbours().of(&base, 0);
        assert!(now.iter().all(|n| n.kind == Kind::Fault), "{faults:?}");
        assert!(later.is_empty());
    }
    // The stress option reopens them.
    let stressed = schedule(Workload::Loop, at("workload_loop", 0, 1), &[], true);
    assert!(neighbours().of(&stressed, 0).0.iter().any(|n| n.kind != Kind::Fault));
}

#[test]
fn a_first_nmi_from_ring3_gets_faults_at_every_point_and_the_return_to_user() {
    let base = schedule(Workload::User, at("user_point_a", 7, 2), &[Fault::Pf], false);
    let (now, _) = neighbours().of(&base, 5);
    assert!(now.iter().all(|n| n.priority >= 5));
    // Every fault, revoke-cs too, with the first NMI where it was and at each ring-3 point.
    let faults: Vec<(Injection, Vec<Fault>)> = now
        .iter()
        .filter(|n| n.kind == Kind::Fault)
        .map(|n| (n.schedule.injections[0].clone(), n.schedule.actions[0].faults.clone()))
        .collect();
    assert_eq!(faults.len(), 2 * Fault::ALL.len());
    assert!(faults.contains(&(at("user_point_a", 7, 1), vec![Fault::RevokeCs])));
    // Its handling leaves through the return to user: second NMIs go there, IRETQ first.
    let nests: Vec<(String, u64, u32)> =
        now.iter().filter(|n| matches!(n.kind, Kind::Nest { .. })).map(last).collect();
    let ldt = |offset| ("native_irq_return_ldt".to_owned(), offset, 1);
    assert_eq!(nests, [ldt(6), ldt(4), ldt(2), ldt(0)]);
}

#[test]
fn a_kept_nest_gets_third_nmis_by_the_sum_of_ranks() {
    let base = schedule(Workload::Loop, at("workload_loop", 4, 1), &[Fault::Bp], false);
    let neighbours = neighbours();
    let (now, _) = neighbours.of(&base, 8);
    let kept = now.iter().find(|n| n.kind == Kind::Nest { rank: 2 }).unwrap();
    let thirds = neighbours.thirds(kept, 2);
    assert_eq!(thirds.len(), 10, "every entry instruction is within the horizon here");
    for (rank, third) in thirds.iter().enumerate() {
        assert_eq!(third.kind, Kind::Third);
        assert_eq!(third.priority, kept.priority + 1 + rank);
        assert_eq!(third.schedule.injections[..2], kept.schedule.injections[..]);
        assert_eq!(third.schedule.injections.len(), 3);
    }
}

#[test]
fn each_corpus_entry_is_expanded_once_and_entries_take_turns() {
    let neighbours = neighbours();
    let mut corpus = InMemoryCorpus::<NmiInput>::new();
    for offset in [0, 8] {
        let base = schedule(Workload::Loop, at("workload_loop", offset, 1), &[Fault::Ud], false);
        corpus.add(Testcase::new(NmiInput(base))).unwrap();
    }
    let mut expansion = Expansion::default();
    let mut tried = Vec::new();
    while let Some(neighbour) = expansion.next(&neighbours, &corpus).unwrap() {
        tried.push(neighbour);
    }
    // 3 faults, 10 second NMIs at occurrence 1 and 10 at occurrence 2, per entry; none twice.
    assert_eq!(tried.len(), 2 * (3 + 10 + 10));
    let distinct: HashSet<u64> = tried.iter().map(|n| super::key(&n.schedule)).collect();
    assert_eq!(distinct.len(), tried.len());
    // The second entry's neighbours start after the first's eighth point, not after its last.
    let first_of_second = tried.iter().position(|n| n.priority == super::STRIDE).unwrap();
    assert!(tried[first_of_second..].iter().any(|n| n.kind == Kind::Nest { rank: 9 }));
    // Every occurrence 2 comes after every occurrence 1.
    let occurrence = |n: &Neighbour| last(n).2;
    let first_second = tried.iter().position(|n| occurrence(n) == 2).unwrap();
    assert!(tried[first_second..].iter().all(|n| occurrence(n) == 2));
    // Nothing is expanded again.
    assert!(expansion.next(&neighbours, &corpus).unwrap().is_none());
}

#[test]
fn user_schedules_get_a_lone_first_nmi_at_every_gap_instruction_once() {
    let gaps_of = |base: &Schedule| -> Vec<Neighbour> {
        neighbours().of(base, 0).0.into_iter().filter(|n| n.kind == Kind::Gap).collect()
    };
    let base = schedule(Workload::User, at("user_point_a", 7, 1), &[Fault::Ud], false);
    let gaps = gaps_of(&base);
    let placed: Vec<(String, u64, u32)> = gaps.iter().map(last).collect();
    let mut expected = Vec::new();
    for (symbol, offset) in
        [("entry_SYSCALL_64", 0), ("entry_SYSCALL_64", 1), ("syscall_return_via_sysret", 0)]
    {
        expected.extend((1..=3).map(|occurrence| (symbol.to_owned(), offset, occurrence)));
    }
    assert_eq!(placed, expected);
    // Alone, and the same whatever the base: the stage tries them once.
    assert!(gaps.iter().all(|n| n.schedule.injections.len() == 1 && n.schedule.actions.is_empty()));
    let other = schedule(Workload::User, at("user_point_a", 7, 2), &[Fault::Pf], true);
    let schedules = |gaps: Vec<Neighbour>| gaps.into_iter().map(|n| n.schedule).collect::<Vec<_>>();
    assert_eq!(schedules(gaps_of(&other)), schedules(gaps));
    // The loop workload has no system calls.
    let looped = schedule(Workload::Loop, at("workload_loop", 4, 1), &[Fault::Ud], false);
    assert!(gaps_of(&looped).is_empty());
}
