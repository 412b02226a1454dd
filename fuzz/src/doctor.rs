//! `nmifuzz doctor`: checks KVM, boots the guest, probes the host's stepping and NMI quirks,
//! and explains what the engine does about each; and whether the host has a retired-instruction
//! counter the fast mode could reach `after: N` points with.

use std::path::Path;

use anyhow::Result;

use crate::target::Target;

pub fn run() -> Result<()> {
    let target = Target::new()?;
    let image = target.vm().image();
    println!("KVM: /dev/kvm usable; every capability nmifuzz needs is present");
    println!(
        "guest: embedded, {} symbols, hash {:016x}, booted to READY",
        image.symbols().len(),
        image.hash()
    );
    println!("host profile: {}", target.profile());
    for (property, holds, meaning) in target.profile().explain() {
        println!("  [{}] {property}: {meaning}", if holds { "yes" } else { " no" });
    }
    let pmu = Path::new(CORE_PMU).exists();
    println!(
        "  [{}] a retired-instruction counter (core PMU, {CORE_PMU}): {}",
        if pmu { "yes" } else { " no" },
        if pmu {
            "present, though the fast mode does not use it yet: `after: N` points are stepped"
        } else {
            "none; `after: N` points stay a stepped-engine feature and campaigns use symbolic points"
        }
    );
    Ok(())
}

/// Where Linux lists the core PMU whose hardware events (retired instructions) perf counts;
/// absent when the (virtual) CPU has none, as on this project's kvm_pvm hosts, where
/// perf_event_open of PERF_COUNT_HW_INSTRUCTIONS fails with ENOENT.
const CORE_PMU: &str = "/sys/bus/event_source/devices/cpu";
