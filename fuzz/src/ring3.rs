//! The user-mode half of the guest as the fuzzer names it: the ring-3 points of the user
//! workload and the ring-0 paths around ring 3 (the two SYSCALL gaps, each entry's user path,
//! the return to user), each found through one constant list of guest symbols.
//!
//! The generator draws the first NMI of a user schedule from these places ([`crate::points`]),
//! the coverage key names them ([`crate::states`]) and the user sweep puts NMIs at every
//! boundary of them (`sweep::user`). A guest without the user workload has none of the symbols:
//! then [`Regions::has_user_points`] is false and everything falls back to the loop workload.
//!
//! A region is the code `vmm::GuestImage::locate` attributes to its symbols: a label without
//! a size runs to the next symbol, so `entry_SYSCALL_64` ends where
//! `entry_SYSCALL_64_after_swapgs` begins, and that one where `..._stack_switched` begins.

use std::ops::Range;

use nmifuzz_abi::Variant;
use serde::Serialize;
use vmm::GuestImage;
use vmm::engine::decode::InsnCache;
use vmm::memory::GuestRam;

/// Symbols of the ring-3 points: each labels a write to `nmifuzz_abi::USER_POINT_ADDRESS`, whose
/// MMIO exit is the only boundary of ring-3 code the host can inject at on kvm_pvm.
pub const USER_POINT_PREFIX: &str = "user_point_";
/// Symbols of other ring-3 code (coverage only: the host never stops there).
pub const USER_CODE_PREFIX: &str = "user_";
/// The SYSCALL entry gap: ring 0, still on the user's RSP, until the switch to the kernel
/// stack (`entry_SYSCALL_64_stack_switched`, not part of it).
pub const SYSCALL_ENTRY_GAP: &[&str] = &["entry_SYSCALL_64", "entry_SYSCALL_64_after_swapgs"];
/// The SYSCALL exit gap: `swapgs; sysretq` on the user's RSP.
pub const SYSRET_GAP: &[&str] = &["syscall_sysret_gap"];
/// The ring-0 paths back to user: the SYSRET path up to its gap, the IRET path, espfix64's
/// copy of the frame and the final IRETQ.
pub const RETURN_TO_USER: &[&str] = &[
    "syscall_return_via_sysret",
    "return_to_user_iret",
    "native_irq_return_ldt",
    "native_irq_return_iret",
];
/// Each entry's user path is its entry symbol with this suffix: `nmi_<variant>_from_user`.
pub const NMI_USER_PATH_SUFFIX: &str = "_from_user";

/// Most bytes one symbol's region may span: a label at the end of a section would otherwise
/// run to the next section's first symbol.
const MAX_REGION_BYTES: u64 = 4096;

/// A place around ring 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Region {
    /// A ring-3 point: the boundary right after a user point write (its MMIO exit).
    UserPoint,
    /// The SYSCALL entry gap ([`SYSCALL_ENTRY_GAP`]).
    SyscallGap,
    /// The SYSCALL exit gap ([`SYSRET_GAP`]).
    SysretGap,
    /// The variant's NMI path from user (`nmi_<variant>_from_user`).
    NmiUserPath,
    /// The return to user ([`RETURN_TO_USER`]).
    ReturnToUser,
}

impl Region {
    /// What the region is, for people.
    pub fn name(self) -> &'static str {
        match self {
            Self::UserPoint => "ring-3 points",
            Self::SyscallGap => "SYSCALL entry gap",
            Self::SysretGap => "SYSCALL exit gap",
            Self::NmiUserPath => "the entry's user path",
            Self::ReturnToUser => "return to user",
        }
    }

    /// Whether a first NMI here gets second NMIs at every boundary of its handling in the user
    /// sweep: where an NMI interrupted ring 3 or ring 0 on the user's stack.
    pub fn nests(self) -> bool {
        matches!(self, Self::UserPoint | Self::SyscallGap | Self::SysretGap)
    }

    /// Whether an NMI here interrupts ring 3 (where `revoke-cs` does something).
    pub fn is_ring3(self) -> bool {
        self == Self::UserPoint
    }
}

/// Where the regions lie in one guest, for one variant.
#[derive(Clone, Debug, Default)]
pub struct Regions {
    /// The ring-0 regions, in address order.
    spans: Vec<(Range<u64>, Region)>,
    /// The ring-3 points (the boundaries after the point writes), sorted.
    points: Vec<u64>,
    /// Ring-3 code other than the points.
    user_code: Vec<Range<u64>>,
    /// Every instruction boundary of the spans, and the points.
    insns: Vec<(u64, Region)>,
}

impl Regions {
    /// The regions of the constants above, with `variant`'s user path.
    pub fn new(image: &GuestImage, ram: &GuestRam, variant: Variant) -> Self {
        let user_path = format!("{}{NMI_USER_PATH_SUFFIX}", variant.entry_symbol());
        let spans: [(Region, Vec<&str>); 4] = [
            (Region::SyscallGap, SYSCALL_ENTRY_GAP.to_vec()),
            (Region::SysretGap, SYSRET_GAP.to_vec()),
            (Region::NmiUserPath, vec![user_path.as_str()]),
            (Region::ReturnToUser, RETURN_TO_USER.to_vec()),
        ];
        Self::from_symbols(image, ram, &spans, USER_POINT_PREFIX)
    }

    /// Regions made of the symbols `spans` names, and ring-3 points at the symbols whose names
    /// start with `point_prefix` (the boundary after the first point write of each, or the symbol
    /// itself if it has none). Symbols the guest lacks are left out.
    pub fn from_symbols(
        image: &GuestImage,
        ram: &GuestRam,
        spans: &[(Region, Vec<&str>)],
        point_prefix: &str,
    ) -> Self {
        let mut decoder = InsnCache::default();
        let mut regions = Self::default();
        for (region, names) in spans {
            for name in names {
                for range in extent(image, name) {
                    regions.spans.push((range, *region));
                }
            }
        }
        regions.spans.sort_by_key(|(range, _)| range.start);
        for (range, region) in &regions.spans {
            let mut at = range.start;
            while at < range.end {
                regions.insns.push((at, *region));
                match decoder.get(ram, at) {
                    Ok(insn) if insn.len > 0 => at += u64::from(insn.len),
                    _ => break,
                }
            }
        }
        let prefixed = |prefix: &str| {
            let mut names: Vec<&str> = image
                .symbols()
                .iter()
                .filter(|s| s.name.starts_with(prefix))
                .map(|s| s.name.as_str())
                .collect();
            names.dedup();
            names
        };
        for name in prefixed(point_prefix) {
            for range in extent(image, name) {
                regions.points.push(point_after_write(&mut decoder, ram, range));
            }
        }
        regions.points.sort_unstable();
        regions.points.dedup();
        regions.insns.extend(regions.points.iter().map(|&p| (p, Region::UserPoint)));
        regions.insns.sort_unstable();
        regions.insns.dedup_by_key(|(address, _)| *address);
        for name in prefixed(USER_CODE_PREFIX) {
            if !name.starts_with(point_prefix) {
                regions.user_code.extend(extent(image, name));
            }
        }
        regions
    }

    /// Whether the guest has ring-3 points, i.e. the user workload.
    pub fn has_user_points(&self) -> bool {
        !self.points.is_empty()
    }

    /// The region of the boundary before the instruction at `rip`.
    pub fn classify(&self, rip: u64) -> Option<Region> {
        if self.points.binary_search(&rip).is_ok() {
            return Some(Region::UserPoint);
        }
        self.spans.iter().find(|(range, _)| range.contains(&rip)).map(|&(_, region)| region)
    }

    /// The number of the ring-3 point at `rip`, in address order.
    pub fn point_index(&self, rip: u64) -> Option<usize> {
        self.points.binary_search(&rip).ok()
    }

    /// Whether `rip` is ring-3 code that is not a point.
    pub fn in_user_code(&self, rip: u64) -> bool {
        self.user_code.iter().any(|range| range.contains(&rip))
    }

    /// Every instruction boundary of the regions, in address order.
    pub fn insns(&self) -> &[(u64, Region)] {
        &self.insns
    }
}

/// The addresses `image.locate` attributes to the symbol `name` (the first of that name), as
/// ranges: its bytes up to its size, or for a label up to the next symbol, less those a closer
/// symbol claims; at most [`MAX_REGION_BYTES`].
fn extent(image: &GuestImage, name: &str) -> Vec<Range<u64>> {
    let symbols = image.symbols();
    let Some(symbol) = symbols.iter().find(|s| s.name == name) else { return Vec::new() };
    let end = if symbol.size > 0 {
        symbol.address + symbol.size
    } else {
        symbols.iter().map(|s| s.address).find(|&a| a > symbol.address).unwrap_or(u64::MAX)
    };
    let end = end.min(symbol.address + MAX_REGION_BYTES);
    let mut ranges: Vec<Range<u64>> = Vec::new();
    for address in symbol.address..end {
        let ours = image.locate(address).is_some_and(|(s, _)| s.name == name);
        match ranges.last_mut() {
            Some(last) if ours && last.end == address => last.end = address + 1,
            _ if ours => ranges.push(address..address + 1),
            _ => {}
        }
    }
    ranges
}

/// The ring-3 point of a user point symbol spanning `ranges`: the boundary after its first
/// point write (`vmm::engine::decode::is_ring3_point`), or its start if it has none.
fn point_after_write(decoder: &mut InsnCache, ram: &GuestRam, range: Range<u64>) -> u64 {
    let mut at = range.start;
    while at < range.end {
        match decoder.get(ram, at) {
            Ok(insn) if insn.is_ring3_point => return at + u64::from(insn.len),
            Ok(insn) if insn.len > 0 => at += u64::from(insn.len),
            _ => break,
        }
    }
    range.start
}

#[cfg(test)]
mod tests {
    use vmm::{Vm, VmConfig};

    use super::*;

    /// The booted embedded guest, unless KVM tests are skipped.
    fn guest() -> Option<Vm> {
        if std::env::var_os("NMIFUZZ_SKIP_KVM_TESTS").is_some_and(|v| v == "1") {
            return None;
        }
        Some(Vm::new(&VmConfig::default(), vmm::EMBEDDED_GUEST.to_vec()).expect("the guest boots"))
    }

    #[test]
    fn the_current_guest_is_classified_without_surprises() {
        // The guest embedded in this build: with the user workload, its points and regions;
        // without it, none, and nothing it runs is taken for ring 3.
        let Some(vm) = guest() else { return };
        let (image, ram) = (vm.image(), vm.ram());
        let regions = Regions::new(image, ram, Variant::LINUX);
        let workload = image.symbol("workload_loop").unwrap();
        assert_eq!(regions.classify(workload), None);
        assert!(!regions.in_user_code(workload));
        if regions.has_user_points() {
            assert!(regions.insns().iter().any(|(_, r)| *r == Region::SyscallGap));
            for &(address, region) in regions.insns() {
                assert_eq!(regions.classify(address), Some(region), "{address:#x}");
            }
        } else {
            assert!(regions.insns().iter().all(|(_, r)| *r != Region::UserPoint));
        }
    }

    #[test]
    fn regions_follow_the_symbols_they_are_named_by() {
        // The loop's own symbols stand in for the user workload's: `workload_loop_top` as a
        // span, the exception path's symbols as "points".
        let Some(vm) = guest() else { return };
        let (image, ram) = (vm.image(), vm.ram());
        let spans = [(Region::SyscallGap, vec!["do_nmi"])];
        let regions = Regions::from_symbols(image, ram, &spans, "exception_common");
        let do_nmi = image.symbols().iter().find(|s| s.name == "do_nmi").unwrap();
        assert_eq!(regions.classify(do_nmi.address), Some(Region::SyscallGap));
        assert_eq!(regions.classify(do_nmi.address + do_nmi.size), None);
        let insns: Vec<u64> = regions
            .insns()
            .iter()
            .filter(|(_, r)| *r == Region::SyscallGap)
            .map(|(a, _)| *a)
            .collect();
        assert_eq!(insns[0], do_nmi.address);
        assert!(insns.len() > 10 && insns.iter().all(|a| *a < do_nmi.address + do_nmi.size));
        // A "point" without a point write is its symbol's start.
        let common = image.symbol("exception_common").unwrap();
        assert!(regions.has_user_points());
        assert!(regions.point_index(common).is_some());
        assert_eq!(regions.classify(common), Some(Region::UserPoint));
        assert!(Regions::from_symbols(image, ram, &[], "no_such_prefix_").insns().is_empty());
    }
}
