//! Symbolic points from a stepped run: the injections of an execution restated as "the n-th
//! time this address is reached since the previous injection", so that the fast mode can
//! execute a schedule the stepped engine measured.

use super::Execution;
use super::schedule::{Injection, Point, Trigger};
use super::trace::Event;
use crate::image::GuestImage;

/// The injections of `execution` (a run with `keep_trace`) as symbolic triggers, in schedule
/// order. Each is anchored at the latest stop up to its own, after the previous injection's
/// stop, whose address `anchorable` accepts (a breakpoint counts its hits the way the stepped
/// engine counts its stops), plus the instructions from the anchor to the injection as
/// `extra`. An injection at the previous one's stop stays `after: 0`. Returns `None` if an
/// injection has no such anchor or the trace does not show every injection.
pub fn symbolic_triggers(
    execution: &Execution,
    injections: usize,
    mut anchorable: impl FnMut(u64) -> bool,
) -> Option<Vec<Trigger>> {
    let trace = &execution.trace;
    let mut triggers = Vec::with_capacity(injections);
    let mut previous: Option<usize> = None;
    for index in 0..injections {
        let at = trace.iter().position(|step| {
            step.events
                .iter()
                .any(|e| matches!(e, Event::NmiInjected { index: i, .. } if *i == index))
        })?;
        if previous == Some(at) {
            triggers.push(Trigger::After(0));
            continue;
        }
        let since = previous.map_or(0, |p| p + 1);
        let anchor = (since..=at).rev().find(|&i| anchorable(trace[i].rip))?;
        let address = trace[anchor].rip;
        let occurrence = trace[since..=anchor].iter().filter(|s| s.rip == address).count();
        triggers.push(Trigger::At {
            address,
            occurrence: occurrence as u32,
            extra: trace[at].index - trace[anchor].index,
        });
        previous = Some(at);
    }
    Some(triggers)
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
