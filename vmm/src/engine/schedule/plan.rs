//! From a schedule to what the engine executes: the guest script and the injections with
//! their symbols resolved against the guest image.

use nmifuzz_abi::{Action, Script};

use super::{Injection, Problem, Schedule};
use crate::image::GuestImage;

impl Schedule {
    /// The guest script of this schedule.
    pub fn script(&self) -> Result<Script, Problem> {
        let mut script =
            Script::new(self.variant()?, self.workload.abi(), self.workload_iterations);
        if self.stress_unmask {
            script.options |= nmifuzz_abi::option::STRESS_UNMASK;
        }
        script.action_count = self.actions.len() as u32;
        for (slot, action) in script.actions.iter_mut().zip(&self.actions) {
            *slot = Action {
                busy: action.busy,
                faults: action.faults.iter().fold(0, |bits, f| bits | f.bit()),
                ..Action::NONE
            };
        }
        script.user_flag_count = self.user_flags.len() as u32;
        for (slot, flags) in script.user_flags.iter_mut().zip(&self.user_flags) {
            *slot = flags.iter().fold(0, |bits, f| bits | f.bit());
        }
        Ok(script)
    }

    /// Resolves symbols against `image` into the plan the engine executes.
    pub fn resolve(&self, image: &GuestImage) -> Result<Plan, Problem> {
        let script = self.script()?;
        let injections = self
            .injections
            .iter()
            .map(|injection| match injection {
                Injection::After(n) => Ok(Trigger::After(*n)),
                Injection::At(p) => {
                    let symbol = image
                        .symbols()
                        .iter()
                        .find(|s| s.name == p.symbol)
                        .ok_or_else(|| Problem::UnknownSymbol(p.symbol.clone()))?;
                    if symbol.size != 0 && p.offset >= symbol.size {
                        return Err(Problem::OffsetOutsideSymbol {
                            symbol: p.symbol.clone(),
                            offset: p.offset,
                            size: symbol.size,
                        });
                    }
                    Ok(Trigger::At {
                        address: symbol.address + p.offset,
                        occurrence: p.occurrence,
                        extra: p.extra,
                    })
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Plan { script, injections })
    }
}

/// A schedule with its symbols resolved: what the engine executes.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Written into the guest before the run.
    pub script: Script,
    /// The NMIs, in order.
    pub injections: Vec<Trigger>,
}

/// When one NMI of a [`Plan`] arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Instructions after the previous injection (or the start).
    After(u64),
    /// The `occurrence`-th time `address` is reached after the previous injection, plus
    /// `extra` instructions.
    At {
        /// Guest address.
        address: u64,
        /// Counting from 1.
        occurrence: u32,
        /// Instructions after reaching it.
        extra: u64,
    },
}

#[cfg(test)]
mod tests {
    use nmifuzz_abi::fault;

    use super::*;
    use crate::engine::schedule::test_support::{MINIMAL, parse};
    use crate::engine::schedule::{Fault, HandlerAction, Point, Workload};

    #[test]
    fn symbols_resolve_against_the_guest() {
        let image = GuestImage::parse(crate::EMBEDDED_GUEST.to_vec(), 16 << 20).unwrap();
        let mut s = parse(MINIMAL).unwrap();
        s.injections = vec![Injection::At(Point {
            symbol: "do_nmi".into(),
            offset: 0,
            occurrence: 1,
            extra: 2,
        })];
        let plan = s.resolve(&image).unwrap();
        let address = image.symbol("do_nmi").unwrap();
        assert_eq!(plan.injections, vec![Trigger::At { address, occurrence: 1, extra: 2 }]);
        let Injection::At(point) = &mut s.injections[0] else { unreachable!() };
        point.symbol = "no_such_symbol".into();
        assert_eq!(s.resolve(&image).unwrap_err(), Problem::UnknownSymbol("no_such_symbol".into()));
        let Injection::At(point) = &mut s.injections[0] else { unreachable!() };
        point.symbol = "do_nmi".into();
        point.offset = 1 << 20;
        assert!(matches!(s.resolve(&image).unwrap_err(), Problem::OffsetOutsideSymbol { .. }));
    }

    #[test]
    fn script_carries_actions() {
        let mut s = parse(MINIMAL).unwrap();
        s.actions = vec![
            HandlerAction { busy: 7, faults: vec![Fault::Ud] },
            HandlerAction::default(),
            HandlerAction { busy: 0, faults: vec![Fault::Pf, Fault::Bp] },
        ];
        let script = s.script().unwrap();
        assert_eq!(script.action_count, 3);
        assert_eq!(script.actions[0], Action { busy: 7, faults: fault::UD, ..Action::NONE });
        assert_eq!(script.actions[1], Action::default());
        assert_eq!(
            script.actions[2],
            Action { busy: 0, faults: fault::PF | fault::BP, ..Action::NONE }
        );
        assert_eq!(script.workload, nmifuzz_abi::Workload::Loop as u32);
        s.workload = Workload::User;
        s.workload_iterations = 3;
        s.actions = vec![HandlerAction { busy: 0, faults: vec![Fault::RevokeCs, Fault::Ud] }];
        let script = s.script().unwrap();
        assert_eq!((script.workload, script.workload_arg), (nmifuzz_abi::Workload::User as u32, 3));
        assert_eq!(script.actions[0].faults, fault::REVOKE_CS | fault::UD);
    }
}
