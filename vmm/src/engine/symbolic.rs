//! Symbolic points from a stepped run: the injections of an execution restated as "the n-th
//! time this address is reached since the previous injection", so that the fast mode can
//! execute a schedule the stepped engine measured.

use super::Execution;
use super::schedule::{Injection, Point, Trigger};
use super::trace::{Event, Step};
use crate::image::GuestImage;

/// The injections of `execution` (a run with `keep_trace`) as symbolic triggers, in schedule
/// order (see [`point_between`]). An injection at the previous one's stop stays `after: 0`.
/// Returns `None` if an injection has no anchor or the trace does not show every injection.
pub fn symbolic_triggers(
    execution: &Execution,
    injections: usize,
    mut anchorable: impl FnMut(u64) -> bool,
) -> Option<Vec<Trigger>> {
    let trace = &execution.trace;
    let mut triggers = Vec::with_capacity(injections);
    let mut previous: Option<usize> = None;
    for index in 0..injections {
        let at = injection_stop(trace, index)?;
        triggers.push(if previous == Some(at) {
            Trigger::After(0)
        } else {
            point_between(trace, previous.map_or(0, |p| p + 1), at, &mut anchorable)?
        });
        previous = Some(at);
    }
    Some(triggers)
}

/// The position in `trace` of the stop where injection `index` of the schedule was made.
pub fn injection_stop(trace: &[Step], index: usize) -> Option<usize> {
    trace.iter().position(|step| {
        step.events.iter().any(|e| matches!(e, Event::NmiInjected { index: i, .. } if *i == index))
    })
}

/// The injection at stop `at` of `trace` as a symbolic point counted from stop `since`: it is
/// anchored at the latest stop in `since..=at` whose address `anchorable` accepts (a
/// breakpoint counts its hits the way the stepped engine counts its stops), the n-th stop at
/// that address since `since`, plus the instructions from the anchor to `at` as `extra`.
pub fn point_between(
    trace: &[Step],
    since: usize,
    at: usize,
    anchorable: impl FnMut(u64) -> bool,
) -> Option<Trigger> {
    anchored(trace, since, at, trace[at].index, anchorable)
}

/// An `after` injection due at instruction count `count` (absolute) as a symbolic point
/// counted from stop `since`, where the stepped engine would make it: the first stop at
/// `count`, or, past the end of `trace` (where that run stopped stepping), `count -` the last
/// stop's count instructions after it. `None` if the count falls between two stops (the
/// stepped engine never makes such an injection) or nothing is anchorable.
pub fn point_at_count(
    trace: &[Step],
    since: usize,
    count: u64,
    anchorable: impl FnMut(u64) -> bool,
) -> Option<Trigger> {
    let end = match trace[since..].iter().position(|s| s.index >= count) {
        Some(i) if trace[since + i].index == count => since + i,
        Some(_) => return None,
        None => trace.len().checked_sub(1).filter(|&last| last >= since)?,
    };
    anchored(trace, since, end, count, anchorable)
}

/// The point `count - anchor's count` instructions after the latest anchorable stop of
/// `since..=end`, counted in stops at its address since `since`.
fn anchored(
    trace: &[Step],
    since: usize,
    end: usize,
    count: u64,
    mut anchorable: impl FnMut(u64) -> bool,
) -> Option<Trigger> {
    let anchor = (since..=end).rev().find(|&i| anchorable(trace[i].rip))?;
    let address = trace[anchor].rip;
    let occurrence = trace[since..=anchor].iter().filter(|s| s.rip == address).count();
    Some(Trigger::At { address, occurrence: occurrence as u32, extra: count - trace[anchor].index })
}

/// `triggers` as schedule injections, each address named by its symbol and offset; `None` if
/// an address lies in no symbol of `image`.
pub fn symbolic_injections(triggers: &[Trigger], image: &GuestImage) -> Option<Vec<Injection>> {
    triggers
        .iter()
        .map(|trigger| match *trigger {
            Trigger::After(n) => Some(Injection::After(n)),
            Trigger::At { address, occurrence, extra } => {
                let (symbol, offset) = image.locate(address)?;
                Some(Injection::At(Point {
                    symbol: symbol.name.clone(),
                    offset,
                    occurrence,
                    extra,
                }))
            }
        })
        .collect()
}
