//! `nmifuzz doctor`: checks KVM, boots the guest, probes the host's stepping and NMI quirks,
//! and explains what the engine does about each.

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
    Ok(())
}
