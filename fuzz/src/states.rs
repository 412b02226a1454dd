//! The campaign's coverage: a small map of NMI states, not of RIP edges.
//!
//! The engine reports the NMI state at every injection, delivery, handler-entry stop and
//! IRETQ it sees (`vmm::engine::observe`); each becomes a key of
//! - the moment (and how an injection was taken, the exception vector, or where an IRETQ
//!   returns to);
//! - where the guest was: exact (the offset) inside the variant's entry assembly, coarse
//!   elsewhere: `do_nmi`, each exception vector's stub, the common exception path, the
//!   workload, other NMI-handling code, anything else; around ring 3 ([`crate::ring3`]): each
//!   ring-3 point by number, other ring-3 code, the SYSCALL entry gap, the exit gap, the
//!   entry's user path and the return to user. For a delivery that is where the NMI struck,
//!   which is what the entry's decision (first, nested, inside the repeat window, from user)
//!   depends on; the depth after it shows which way the entry went as far as the host sees;
//! - the nesting depth, the "NMI executing" variable and the NMIs still undelivered (latched),
//!   each capped at a few values.
//!
//! A key sets one byte of the map: an execution is new when it reaches a state no execution
//! reached before, however often. RIP edges with hit counts made about 60% of executions
//! "new" (design.md, section 6).
//!
//! What the key cannot hold: which exception frames are live inside NMI handling, since the
//! fast mode free-runs there and sees exception entries only while it steps.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::ops::Range;

use nmifuzz_abi::Variant;
use vmm::GuestImage;
use vmm::engine::observe::{Moment, NmiObserver, NmiState};
use vmm::memory::GuestRam;

use crate::ring3::{Region, Regions};

/// Bytes of the coverage map.
pub const MAP_SIZE: usize = 4096;

/// Bytes per exception stub in the guest's `exception_stubs` table (one per vector).
const STUB_SIZE: u64 = 16;

/// Where the guest was, as the key holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Place {
    /// This many bytes into the variant's entry.
    Entry(u64),
    DoNmi,
    /// The stub of this vector.
    ExceptionStub(u64),
    ExceptionPath,
    Workload,
    OtherNmiCode,
    Elsewhere,
    /// This ring-3 point (by number, in address order).
    UserPoint(usize),
    /// Ring-3 code other than the points.
    UserCode,
    /// A ring-0 region around ring 3.
    AroundRing3(Region),
}

/// The guest's code regions a key names, for one variant.
pub struct Places {
    entry: Range<u64>,
    do_nmi: Range<u64>,
    stubs: Range<u64>,
    exception_path: Vec<Range<u64>>,
    workload: Range<u64>,
    nmi_code: Range<u64>,
    ring3: Regions,
}

impl Places {
    /// The regions of `image` (loaded in `ram`) for the entry of `variant`.
    pub fn new(image: &GuestImage, ram: &GuestRam, variant: Variant) -> Self {
        Self::with_ring3(image, variant, Regions::new(image, ram, variant))
    }

    /// The regions of `image` for the entry of `variant`, with `ring3` as the places around
    /// ring 3.
    fn with_ring3(image: &GuestImage, variant: Variant, ring3: Regions) -> Self {
        let sized = |name: &str| {
            image
                .symbols()
                .iter()
                .find(|s| s.name == name)
                .map_or(0..0, |s| s.address..s.address + s.size)
        };
        let marker = |name: &str| image.marker(name).unwrap_or(0);
        Self {
            entry: sized(variant.entry_symbol()),
            do_nmi: sized("do_nmi"),
            stubs: sized("exception_stubs"),
            exception_path: vec![sized("exception_common"), sized("exception_dispatch")],
            workload: sized("workload_loop"),
            nmi_code: marker(nmifuzz_abi::NMI_CODE_START)..marker(nmifuzz_abi::NMI_CODE_END),
            ring3,
        }
    }

    fn place(&self, rip: u64) -> Place {
        if self.entry.contains(&rip) {
            Place::Entry(rip - self.entry.start)
        } else if self.do_nmi.contains(&rip) {
            Place::DoNmi
        } else if self.stubs.contains(&rip) {
            Place::ExceptionStub((rip - self.stubs.start) / STUB_SIZE)
        } else if self.exception_path.iter().any(|r| r.contains(&rip)) {
            Place::ExceptionPath
        } else if self.workload.contains(&rip) {
            Place::Workload
        } else if let Some(point) = self.ring3.point_index(rip) {
            Place::UserPoint(point)
        } else if let Some(region) = self.ring3.classify(rip) {
            Place::AroundRing3(region)
        } else if self.nmi_code.contains(&rip) {
            Place::OtherNmiCode
        } else if self.ring3.in_user_code(rip) {
            Place::UserCode
        } else {
            Place::Elsewhere
        }
    }

    /// The map index of `state`.
    pub fn index(&self, state: &NmiState, len: usize) -> usize {
        let mut hasher = DefaultHasher::new();
        match state.moment {
            Moment::Injected { how } => (0u8, how as u8, Place::Elsewhere).hash(&mut hasher),
            Moment::Delivered => (1u8, 0u8, Place::Elsewhere).hash(&mut hasher),
            Moment::HandlerEntry { vector } => (2u8, vector, Place::Elsewhere).hash(&mut hasher),
            Moment::Iretq { target } => (3u8, 0u8, self.place(target)).hash(&mut hasher),
        }
        self.place(state.rip).hash(&mut hasher);
        state.depth.min(3).hash(&mut hasher);
        state.nmi_executing.map(|v| v.min(2)).hash(&mut hasher);
        state.undelivered.min(2).hash(&mut hasher);
        (hasher.finish() % len as u64) as usize
    }
}

/// An observer that marks each state's key in a coverage map.
pub struct StateMap<'m> {
    places: &'m Places,
    map: &'m mut [u8],
}

impl<'m> StateMap<'m> {
    /// Marks keys of `places` in `map` (which the caller clears).
    pub fn new(places: &'m Places, map: &'m mut [u8]) -> Self {
        Self { places, map }
    }
}

impl NmiObserver for StateMap<'_> {
    fn observe(&mut self, state: &NmiState) {
        if !self.map.is_empty() {
            let index = self.places.index(state, self.map.len());
            self.map[index] = 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm::{Vm, VmConfig};

    use super::*;

    fn delivery(rip: u64) -> NmiState {
        NmiState {
            moment: Moment::Delivered,
            rip,
            depth: 1,
            nmi_executing: Some(1),
            undelivered: 0,
        }
    }

    #[test]
    fn nmis_around_ring3_are_states_of_their_own() {
        if std::env::var_os("NMIFUZZ_SKIP_KVM_TESTS").is_some_and(|v| v == "1") {
            return;
        }
        let vm = Vm::new(&VmConfig::default(), vmm::EMBEDDED_GUEST.to_vec()).unwrap();
        let (image, ram) = (vm.image(), vm.ram());
        // Guest code outside every other place stands in for a gap, data for two "points".
        let spans = [(Region::SyscallGap, vec!["workload_mismatch"])];
        let ring3 = Regions::from_symbols(image, ram, &spans, "NMIFUZZ_SCRATCH");
        let places = Places::with_ring3(image, Variant::LINUX, ring3);
        let plain = Places::with_ring3(image, Variant::LINUX, Regions::default());
        let gap = image.symbol("workload_mismatch").unwrap();
        let point = image.symbol("NMIFUZZ_SCRATCH").unwrap();
        let key = |places: &Places, rip| places.index(&delivery(rip), MAP_SIZE);
        assert_eq!(places.place(gap), Place::AroundRing3(Region::SyscallGap));
        assert_eq!(places.place(point), Place::UserPoint(0));
        assert_eq!(plain.place(gap), Place::Elsewhere);
        // The gap is one state wherever in it the NMI struck, and neither the point's nor
        // that of code elsewhere.
        assert_eq!(key(&places, gap), key(&places, gap + 2));
        assert_ne!(key(&places, gap), key(&plain, gap));
        assert_ne!(key(&places, gap), key(&places, point));
        assert_ne!(key(&places, point), key(&plain, point));
        // An IRETQ is keyed by where it returns to.
        let iretq = |target| NmiState { moment: Moment::Iretq { target }, ..delivery(0) };
        assert_ne!(places.index(&iretq(point), MAP_SIZE), places.index(&iretq(gap), MAP_SIZE));
    }
}
