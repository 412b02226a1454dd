//! The fuzzing target: the VM booted with the embedded guest, the host profile, and the engine,
//! executing schedules. Every subcommand that runs guest code goes through it.

use anyhow::{Context, Result};
use nmifuzz_abi::Variant;
use vmm::engine::agreement::{self, Compared, Rng};
use vmm::engine::profile::{self, HostProfile};
use vmm::engine::schedule::{Injection, Origin, Plan, Schedule};
use vmm::engine::symbolic::{symbolic_injections, symbolic_triggers};
use vmm::engine::table::{InstructionTable, TableInsn};
use vmm::engine::{Engine, Execution, RunOptions};
use vmm::{RunLimits, Vm, VmConfig};

use crate::points::Points;
use crate::ring3::Regions;
use crate::states::{Places, StateMap};

/// The engine's options for one execution with a wall-clock limit of `timeout_ms`, the same
/// for every subcommand that executes schedules.
pub fn run_options(timeout_ms: u64) -> RunOptions {
    let wall = std::time::Duration::from_millis(timeout_ms);
    RunOptions { limits: RunLimits { wall, ..RunLimits::default() }, ..RunOptions::default() }
}

/// The VM and the engine that drives it.
pub struct Target {
    vm: Vm,
    engine: Engine,
    /// The code regions coverage keys name, for the variant last executed.
    places: Option<(Variant, Places)>,
}

impl Target {
    /// Boots the embedded guest and calibrates the engine for this host.
    pub fn new() -> Result<Self> {
        let mut vm = Vm::new(&VmConfig::default(), vmm::EMBEDDED_GUEST.to_vec())
            .context("cannot start the VM")?;
        let profile = profile::calibrate(&mut vm).context("cannot calibrate the engine")?;
        let engine = Engine::new(&vm, profile)?;
        Ok(Self { vm, engine, places: None })
    }

    /// The host profile found at start-up.
    pub fn profile(&self) -> &HostProfile {
        self.engine.profile()
    }

    /// The top of the guest's NMI stack (IST1).
    pub fn nmi_stack_top(&self) -> u64 {
        self.engine.nmi_stack_top()
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The instruction table symbolic points of `variant` are drawn from.
    pub fn instruction_table(&self, variant: &str) -> Result<InstructionTable> {
        let variant = Variant::from_name(variant).context("unknown variant")?;
        Ok(InstructionTable::build(self.vm.image(), self.vm.ram(), variant.entry_symbol())?)
    }

    /// The places around ring 3 of `variant` ([`crate::ring3`]).
    pub fn regions(&self, variant: &str) -> Result<Regions> {
        let variant = Variant::from_name(variant).context("unknown variant")?;
        Ok(Regions::new(self.vm.image(), self.vm.ram(), variant))
    }

    /// The symbolic points the generator and the mutators of `variant` draw from: its
    /// instruction table and the places around ring 3 ([`Points`]).
    pub fn points(&self, variant: &str) -> Result<Points> {
        let table = self.instruction_table(variant)?;
        let regions = self.regions(variant)?;
        let image = self.vm.image();
        let around_ring3 = regions
            .insns()
            .iter()
            .filter_map(|&(address, region)| {
                let (symbol, offset) = image.locate(address)?;
                // A point names the first symbol of its name (names can repeat).
                (image.symbol(&symbol.name).ok()? == symbol.address)
                    .then(|| (TableInsn { symbol: symbol.name.clone(), offset, address }, region))
            })
            .collect();
        Ok(Points::new(table, around_ring3))
    }

    /// Whether a symbolic point at `address` is reached alike by both modes
    /// ([`Engine::anchorable`]).
    pub fn anchorable(&mut self, address: u64) -> bool {
        self.engine.anchorable(&self.vm, address)
    }

    /// `schedule` with its `after` injections restated as the symbolic points where one traced
    /// stepped run makes them (`vmm::engine::symbolic`), which the fast mode reaches without
    /// stepping; the schedule itself if it has none, or if that run does not make every
    /// injection.
    pub fn symbolic(&mut self, schedule: &Schedule) -> Result<Schedule> {
        if !schedule.injections.iter().any(|i| matches!(i, Injection::After(n) if *n > 0)) {
            return Ok(schedule.clone());
        }
        let plan = schedule.resolve(self.vm.image())?;
        let traced = RunOptions { keep_trace: true, ..RunOptions::default() };
        let execution = self.engine.run(&mut self.vm, &plan, &traced)?;
        let (engine, vm) = (&mut self.engine, &self.vm);
        let injections = symbolic_triggers(&execution, plan.injections.len(), |address| {
            engine.anchorable(vm, address)
        })
        .and_then(|triggers| symbolic_injections(&triggers, vm.image()));
        Ok(match injections {
            Some(injections) => Schedule { injections, ..schedule.clone() },
            None => schedule.clone(),
        })
    }

    /// What artifacts found here record about their origin.
    pub fn origin(&self) -> Origin {
        Origin {
            guest_hash: format!("{:016x}", self.vm.image().hash()),
            host_profile: self.profile().to_string(),
        }
    }

    /// Warnings about a schedule recorded on another guest or host, for replays.
    pub fn provenance_warnings(&self, schedule: &Schedule) -> Vec<String> {
        let Some(recorded) = &schedule.origin else { return Vec::new() };
        let here = self.origin();
        let mut warnings = Vec::new();
        if recorded.guest_hash != here.guest_hash {
            warnings.push(format!(
                "recorded with guest {}, replaying on guest {}: timings may differ",
                recorded.guest_hash, here.guest_hash
            ));
        }
        if recorded.host_profile != here.host_profile {
            warnings.push(format!(
                "recorded on a host with profile `{}`, this host is `{}`",
                recorded.host_profile, here.host_profile
            ));
        }
        warnings
    }

    /// Executes `schedule`, marking the NMI states it reaches in `coverage` (may be empty; see
    /// [`crate::states`]).
    pub fn execute(
        &mut self,
        schedule: &Schedule,
        options: &RunOptions,
        coverage: &mut [u8],
    ) -> Result<Execution> {
        let plan = schedule.resolve(self.vm.image())?;
        let variant = schedule.variant()?;
        if self.places.as_ref().is_none_or(|(v, _)| *v != variant) {
            self.places = Some((variant, Places::new(self.vm.image(), self.vm.ram(), variant)));
        }
        let (_, places) = self.places.as_ref().expect("set above");
        let mut observer = StateMap::new(places, coverage);
        Ok(self.engine.run_observed(&mut self.vm, &plan, options, &mut observer)?)
    }

    /// A random symbolic schedule for `variant`, executed in both modes
    /// ([`vmm::engine::agreement`], `nmifuzz modes`).
    pub fn compare_modes(
        &mut self,
        rng: &mut Rng,
        variant: &str,
        table: &InstructionTable,
        options: &RunOptions,
    ) -> Result<Compared> {
        Ok(agreement::compare_one(&mut self.engine, &mut self.vm, rng, variant, table, options)?)
    }

    /// Executes a plan as it is, including scripts no schedule can express (`nmifuzz chaos`).
    pub fn execute_plan(&mut self, plan: &Plan, options: &RunOptions) -> Result<Execution> {
        Ok(self.engine.run(&mut self.vm, plan, options)?)
    }
}
