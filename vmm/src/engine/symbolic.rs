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

#[cfg(test)]
mod tests {
    use super::*;

    /// Stops at `(count, rip)`; the injection of `index` at stop `at`.
    fn trace(stops: &[(u64, u64)], injections: &[(usize, usize)]) -> Vec<Step> {
        let mut trace: Vec<Step> = stops
            .iter()
            .map(|&(index, rip)| Step { index, rip, depth: 0, nmi_executing: None, events: vec![] })
            .collect();
        for &(index, at) in injections {
            let how = crate::engine::trace::Injected::Delivered;
            trace[at].events.push(Event::NmiInjected { index, how });
        }
        trace
    }

    #[test]
    fn a_point_counts_the_stops_at_its_address_since_the_previous_injection() {
        // A loop 0x10, 0x20 run three times; a fault at 0x20 the third time (its handler entry
        // 0x90 has the same count).
        let stops = [(0, 0x10), (1, 0x20), (2, 0x10), (3, 0x20), (4, 0x10), (5, 0x20), (5, 0x90)];
        let t = trace(&stops, &[(0, 1), (1, 5)]);
        let any = |_| true;
        assert_eq!(
            point_between(&t, 0, 1, any),
            Some(Trigger::At { address: 0x20, occurrence: 1, extra: 0 })
        );
        // Counted after the first injection's stop: 0x20 again at counts 3 and 5.
        assert_eq!(
            point_between(&t, 2, 5, any),
            Some(Trigger::At { address: 0x20, occurrence: 2, extra: 0 })
        );
        // Off a refused anchor: the latest accepted stop before it, plus extra.
        assert_eq!(
            point_between(&t, 2, 5, |a| a != 0x20),
            Some(Trigger::At { address: 0x10, occurrence: 2, extra: 1 })
        );
        // `after` lands on the first stop with its count, not the handler entry after it.
        assert_eq!(
            point_at_count(&t, 2, 5, any),
            Some(Trigger::At { address: 0x20, occurrence: 2, extra: 0 })
        );
        // Past the trace: its last stop plus the rest.
        assert_eq!(
            point_at_count(&t, 2, 8, any),
            Some(Trigger::At { address: 0x90, occurrence: 1, extra: 3 })
        );
        let gap = trace(&[(0, 0x10), (2, 0x20)], &[]);
        assert_eq!(point_at_count(&gap, 0, 1, any), None, "no stop has count 1");
    }
}
