//! The hostile inputs of `nmifuzz chaos`, drawn deterministically: each run's from a random
//! stream of its own, seeded by the soak's seed and the run's number, so that any job can make
//! any run and a resumed soak starts at its next run without drawing the ones before.
//!
//! Each input is a [`Plan`], the engine's own form, so that chaos can send the guest what no
//! schedule file can say: script bytes that never went through validation, and the chaos-only
//! `scribble` action. Three kinds, mixed by [`Kind::draw`]:
//! - [`Kind::RawScript`]: the script buffer filled with random bytes, or a valid script with a
//!   valid header and random fields, or a valid script with a few bytes garbled;
//! - [`Kind::Limits`]: a schedule that passes [`Schedule::validate`] with one of its limits
//!   pushed to the maximum (injections, delays, busy work, actions, occurrences, workload
//!   length, 0-instruction runs) or with NMIs at symbolic points anywhere in the guest;
//! - [`Kind::Scribble`]: an ordinary schedule whose handler actions overwrite random bytes of
//!   the IDT, GDT, TSS, page tables, NMI or exception stacks, mailbox or script.
//!
//! The schedules run the loop workload and, a quarter of the time, the ring-3 user workload,
//! with every fault (`revoke-cs` included); a raw script may name any finite workload.
//!
//! Nothing here asks on purpose for what must end in the watchdog (the `Spin` workload,
//! workloads longer than a run's wall-clock limit): a timeout comes from what the hostile bytes
//! did to the guest (an endless exception loop, a garbled iteration count).

use libafl_bolts::rands::{Rand, StdRand};
use nmifuzz_abi::{
    ABI_VERSION, MAX_BUSY_ITERATIONS, MAX_SCRIBBLE_BYTES, SCRIPT_ACTION_SLOTS, SCRIPT_MAGIC,
    Scribble, ScribbleArea, Script, Variant, Workload, fault,
};
use vmm::GuestImage;
use vmm::engine::schedule::{
    self, Fault, HandlerAction, Injection, MAX_OCCURRENCE, MAX_USER_ITERATIONS,
    MAX_WORKLOAD_ITERATIONS, Plan, Point, SCHEDULE_FORMAT, SCHEDULE_MAX_DELAY,
    SCHEDULE_MAX_INJECTIONS, Schedule,
};
use vmm::hash::Fnv1a;

use crate::input::random_user_flags;
use zerocopy::{FromBytes, IntoBytes};

/// The kinds of chaos input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Script bytes written past validation.
    RawScript,
    /// A valid schedule at one of its limits.
    Limits,
    /// Handler actions that scribble over guest structures.
    Scribble,
}

impl Kind {
    /// One kind: three in ten raw scripts, three in ten limits, and four in ten scribbles, the
    /// most varied kind.
    fn draw(rand: &mut StdRand) -> Self {
        match rand.below_or_zero(10) {
            0..=2 => Self::RawScript,
            3..=5 => Self::Limits,
            _ => Self::Scribble,
        }
    }
}

/// Workload codes a raw script with a valid header may carry: every workload that ends by
/// itself within a run's limit when its argument is small (not `Spin`, which never does).
const FINITE_WORKLOADS: [Workload; 9] = [
    Workload::Loop,
    Workload::User,
    Workload::Panic,
    Workload::TripleFault,
    Workload::EmulationError,
    Workload::Vmcall,
    Workload::Scribble,
    Workload::Breakpoint,
    Workload::Ping,
];

/// Draws chaos inputs for one guest and variant.
pub struct Inputs<'a> {
    seed: u64,
    /// The stream of the run being drawn.
    rand: StdRand,
    variant: Variant,
    image: &'a GuestImage,
}

impl<'a> Inputs<'a> {
    /// The inputs of the soak `seed` for `variant` on `image`: the same for the same seed.
    pub fn new(seed: u64, variant: Variant, image: &'a GuestImage) -> Self {
        Self { seed, rand: StdRand::with_seed(seed), variant, image }
    }

    /// The input of run number `run`, and its kind.
    pub fn at(&mut self, run: u64) -> (Kind, Plan) {
        let mut stream = Fnv1a::new();
        stream.write(&self.seed.to_le_bytes());
        stream.write(&run.to_le_bytes());
        self.rand = StdRand::with_seed(stream.finish());
        let kind = Kind::draw(&mut self.rand);
        let plan = match kind {
            Kind::RawScript => self.raw_script(),
            Kind::Limits => self.limits(),
            Kind::Scribble => self.scribble(),
        };
        (kind, plan)
    }

    fn raw_script(&mut self) -> Plan {
        let mut script = match self.rand.below_or_zero(3) {
            // Random bytes: almost always a bad magic.
            0 => self.random_script(),
            // A valid header over random fields: the checks behind the magic.
            1 => {
                let mut script = self.random_script();
                script.magic = SCRIPT_MAGIC;
                script.version = ABI_VERSION;
                script.variant = self.odd_code(Variant::ALL.len(), self.variant.code());
                let workload = self.pick(&FINITE_WORKLOADS) as u32;
                script.workload = self.odd_code(FINITE_WORKLOADS.len(), workload);
                script.workload_arg = self.rand.below_or_zero(17) as u32;
                script.options = self.odd_code(2, 0);
                script.reserved = self.odd_code(1, 0);
                script.action_count = self.rand.below_or_zero(SCRIPT_ACTION_SLOTS + 2) as u32;
                script
            }
            // A valid script, garbled in a few bytes.
            _ => {
                let mut script = self.schedule_script();
                let bytes = script.as_mut_bytes();
                for _ in 0..self.rand.between(1, 8) {
                    let at = self.rand.below_or_zero(bytes.len());
                    bytes[at] = self.rand.next() as u8;
                }
                script
            }
        };
        // Never the endless workload, whatever the bytes say.
        if script.workload == Workload::Spin as u32 {
            script.workload = Workload::Loop as u32;
        }
        Plan { script, injections: self.few_injections() }
    }

    /// A script of random bytes.
    fn random_script(&mut self) -> Script {
        let mut bytes = vec![0u8; size_of::<Script>()];
        for chunk in bytes.chunks_mut(8) {
            chunk.copy_from_slice(&self.rand.next().to_le_bytes()[..chunk.len()]);
        }
        Script::read_from_bytes(&bytes).expect("the buffer has the script's exact size")
    }

    /// `valid` three times in four, else a random code below `codes + 2` (just out of range,
    /// or in range but another one).
    fn odd_code(&mut self, codes: usize, valid: u32) -> u32 {
        if self.rand.below_or_zero(4) == 0 {
            self.rand.below_or_zero(codes + 2) as u32
        } else {
            valid
        }
    }

    fn limits(&mut self) -> Plan {
        let mut schedule = self.schedule(1);
        match self.rand.below_or_zero(7) {
            0 => {
                // The most injections, many at the same boundary as the one before.
                schedule.injections = (0..SCHEDULE_MAX_INJECTIONS)
                    .map(|_| Injection::After(self.pick(&[0, 0, 1, 7])))
                    .collect();
            }
            1 => {
                // The longest delays: NMIs that never come before DONE.
                schedule.injections.push(Injection::After(SCHEDULE_MAX_DELAY));
                schedule.injections.push(self.odd_point(SCHEDULE_MAX_DELAY));
            }
            2 => {
                // The most busy work, in NMIs that can nest.
                for action in &mut schedule.actions {
                    action.busy = MAX_BUSY_ITERATIONS;
                    action.faults = Fault::ALL.to_vec();
                }
            }
            3 => {
                // The most actions, each with the most faults the format allows.
                schedule.actions = (0..SCRIPT_ACTION_SLOTS)
                    .map(|_| HandlerAction {
                        busy: self.rand.below_or_zero(4) as u32,
                        faults: (0..8).map(|_| self.pick(Fault::ALL)).collect(),
                    })
                    .collect();
                schedule.injections =
                    (0..SCRIPT_ACTION_SLOTS).map(|_| Injection::After(3)).collect();
            }
            4 => {
                // The longest workload, with its NMIs early so the rest runs free.
                schedule.workload_iterations = match schedule.workload {
                    schedule::Workload::Loop => MAX_WORKLOAD_ITERATIONS,
                    schedule::Workload::User => MAX_USER_ITERATIONS,
                };
            }
            5 => {
                // Symbolic points anywhere, reached at most a few times or never.
                schedule.injections =
                    (0..self.rand.between(1, 4)).map(|_| self.odd_point(8)).collect();
            }
            _ => {
                // The highest occurrence of a point in the loop.
                schedule.injections = vec![Injection::At(Point {
                    symbol: "workload_loop_top".into(),
                    offset: 0,
                    occurrence: MAX_OCCURRENCE,
                    extra: 0,
                })];
            }
        }
        self.plan(&schedule)
    }

    /// An `at` injection at a random typed symbol of the guest (code or data, often never
    /// executed), at a random offset inside it, with `extra` up to `max_extra`.
    fn odd_point(&mut self, max_extra: u64) -> Injection {
        let symbols = self.image.symbols();
        let name = &symbols[self.rand.below_or_zero(symbols.len())].name;
        // Names can repeat (generic instances); a point means the first symbol of its name.
        let symbol = symbols.iter().find(|s| &s.name == name).expect("the name comes from here");
        Injection::At(Point {
            symbol: symbol.name.clone(),
            offset: self.rand.below_or_zero(symbol.size.max(1) as usize) as u64,
            occurrence: self.rand.between(1, 3) as u32,
            extra: self.pick(&[0, 1, max_extra]),
        })
    }

    fn scribble(&mut self) -> Plan {
        let schedule = self.schedule(3);
        let mut plan = self.plan(&schedule);
        let script = &mut plan.script;
        for action in &mut script.actions[..script.action_count as usize] {
            if self.rand.coinflip(0.75) {
                action.faults |= fault::SCRIBBLE;
                action.scribble = Scribble {
                    area: self.pick(ScribbleArea::ALL) as u16,
                    bytes: self.rand.between(1, usize::from(MAX_SCRIBBLE_BYTES)) as u16,
                    seed: self.rand.next() as u32,
                };
            }
        }
        plan
    }

    /// An ordinary schedule of 1 to `most` NMIs, each `after` 0 to 399 instructions, each
    /// handler with a little busy work and, half the time, faults; a quarter of the time on 1
    /// to 3 iterations of the user workload (where `after` counts the ring-0 instructions its
    /// system calls and returns to user run, and the NMIs may strike at its ring-3 points).
    fn schedule(&mut self, most: usize) -> Schedule {
        let count = self.rand.between(1, most);
        let (workload, workload_iterations) = if self.rand.coinflip(0.25) {
            (schedule::Workload::User, self.rand.between(1, 3) as u32)
        } else {
            (schedule::Workload::Loop, 0)
        };
        Schedule {
            format: SCHEDULE_FORMAT,
            description: String::new(),
            variant: self.variant.name().to_owned(),
            workload,
            workload_iterations,
            stress_unmask: false,
            actions: (0..count)
                .map(|_| HandlerAction {
                    busy: self.rand.below_or_zero(17) as u32,
                    faults: if self.rand.coinflip(0.5) {
                        (0..self.rand.between(1, 2)).map(|_| self.pick(Fault::ALL)).collect()
                    } else {
                        Vec::new()
                    },
                })
                .collect(),
            injections: (0..count)
                .map(|_| Injection::After(self.rand.below_or_zero(400) as u64))
                .collect(),
            user_flags: if workload == schedule::Workload::User {
                random_user_flags(&mut self.rand)
            } else {
                Vec::new()
            },
            origin: None,
        }
    }

    fn schedule_script(&mut self) -> Script {
        let schedule = self.schedule(3);
        schedule.script().expect("the chaos variant exists")
    }

    fn few_injections(&mut self) -> Vec<vmm::engine::schedule::Trigger> {
        let schedule = self.schedule(3);
        self.plan(&schedule).injections
    }

    /// The plan of a schedule chaos made; its symbols exist and its limits hold.
    fn plan(&self, schedule: &Schedule) -> Plan {
        debug_assert_eq!(schedule.validate(), Ok(()));
        schedule.resolve(self.image).expect("chaos schedules resolve against their own guest")
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rand.below_or_zero(items.len())]
    }
}
