//! The long-mode IDT gate (Intel SDM vol. 3, figure 6-8): where its handler address lives. One
//! place for the encoding that the VMM writes (installing an entry's NMI gate) and the engine
//! reads (finding the exception handlers to put breakpoints on).

/// Size of an IDT gate in long mode.
pub const GATE_SIZE: u64 = 16;

/// Address of gate `vector` in an IDT at `idt`.
pub const fn gate_address(idt: u64, vector: u64) -> u64 {
    idt + GATE_SIZE * vector
}

/// The handler address of a gate whose two qwords are `low` and `high`: offset bits 0-15 in
/// `low` 0-15, bits 16-31 in `low` 48-63, bits 32-63 in `high` 0-31.
pub const fn gate_target(low: u64, high: u64) -> u64 {
    (low & 0xffff) | ((low >> 32) & 0xffff_0000) | ((high & 0xffff_ffff) << 32)
}

/// The gate's two qwords with the handler address replaced by `target`, its selector, IST and
/// type kept.
pub const fn with_target(low: u64, target: u64) -> (u64, u64) {
    let low = (low & 0x0000_ffff_ffff_0000) | (target & 0xffff) | ((target & 0xffff_0000) << 32);
    (low, target >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_written_is_the_target_read_and_the_rest_of_the_gate_stays() {
        let low = 0x1234_8e01_0008_5678; // selector 0x08, IST 1, type 0xe, present
        let (new_low, high) = with_target(low, 0xffff_8000_0020_1190);
        assert_eq!(gate_target(new_low, high), 0xffff_8000_0020_1190);
        assert_eq!(new_low & 0x0000_ffff_ffff_0000, low & 0x0000_ffff_ffff_0000);
        assert_eq!(gate_address(0x1000, 2), 0x1020);
    }
}
