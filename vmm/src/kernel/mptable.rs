//! A minimal Intel MultiProcessor Specification 1.4 table for one CPU, laid out like
//! Firecracker's `arch/x86_64/mptable.rs`: the floating pointer, then the configuration table
//! with one processor, an ISA bus, the IOAPIC, ISA IRQs 0..=23 wired 1:1 to IOAPIC pins (KVM's
//! default GSI routing), LINT0 as ExtINT and LINT1 as NMI.
//!
//! Without it (and with `acpi=off`) Linux finds no interrupt configuration, disables the
//! IOAPIC and runs the LAPIC in "virtual wire" mode with the 8259 PIC behind LINT0.

/// Where the LAPIC and IOAPIC are (Linux's `APIC_DEFAULT_PHYS_BASE`, `IO_APIC_DEFAULT_PHYS_BASE`).
const LAPIC_BASE: u32 = 0xfee0_0000;
const IOAPIC_BASE: u32 = 0xfec0_0000;
/// Firecracker's values: an integrated APIC, and the IOAPIC's id one past the last CPU's.
const APIC_VERSION: u8 = 0x14;
const IOAPIC_ID: u8 = 2;
/// Number of IOAPIC pins in KVM's in-kernel IOAPIC.
const IOAPIC_PINS: u8 = 24;

/// Entry types (MP spec table 4-3) and interrupt types (table 4-8).
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)).wrapping_neg()
}

/// The floating pointer structure followed by the configuration table, to be written at
/// guest physical address `base` (which must be where Linux scans: the EBDA, the last KiB of
/// base memory, or 0xf0000..0x100000).
pub fn build(base: u64) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count: u16 = 0;

    // Processor: APIC id 0, enabled, bootstrap processor; CPUID signature and feature flags
    // (FPU, APIC) as Firecracker gives them.
    entries.extend_from_slice(&[MP_PROCESSOR, 0, APIC_VERSION, 0b11]);
    entries.extend_from_slice(&0x600u32.to_le_bytes());
    entries.extend_from_slice(&0x201u32.to_le_bytes());
    entries.extend_from_slice(&[0; 8]);
    count += 1;

    // Bus 0: ISA.
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;

    // The IOAPIC, usable.
    entries.extend_from_slice(&[MP_IOAPIC, IOAPIC_ID, APIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_BASE.to_le_bytes());
    count += 1;

    // ISA IRQ n -> IOAPIC pin n, bus-default polarity and trigger.
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, 0, irq, IOAPIC_ID, irq]);
        count += 1;
    }

    // LINT0 of the BSP: ExtINT (the PIC); LINT1 of all CPUs: NMI.
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    // Configuration table header (44 bytes).
    let length = u16::try_from(44 + entries.len()).expect("MP table is small");
    let mut table = Vec::with_capacity(usize::from(length));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"NMIFUZZ "); // OEM id
    table.extend_from_slice(b"000000000000"); // product id
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_BASE.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length and checksum
    debug_assert_eq!(table.len(), 44);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    // Floating pointer structure (16 bytes), pointing just past itself.
    let mut mp = Vec::with_capacity(16 + table.len());
    mp.extend_from_slice(b"_MP_");
    let table_addr = u32::try_from(base + 16).expect("MP table below 4 GiB");
    mp.extend_from_slice(&table_addr.to_le_bytes());
    mp.push(1); // length in 16-byte units
    mp.push(4); // spec revision 1.4
    mp.push(0); // checksum, below
    mp.extend_from_slice(&[0; 5]); // feature bytes: no default configuration, no IMCR
    mp[10] = checksum(&mp);
    mp.extend_from_slice(&table);
    mp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks what Linux's `smp_scan_config` and `smp_check_mpc` check.
    #[test]
    fn table_is_well_formed() {
        let base = 0x9fc00;
        let mp = build(base);
        assert_eq!(&mp[..4], b"_MP_");
        assert_eq!(mp[..16].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let physptr = u32::from_le_bytes(mp[4..8].try_into().unwrap()) as u64;
        let table = &mp[(physptr - base) as usize..];
        assert_eq!(&table[..4], b"PCMP");
        let length = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(length, table.len());
        assert_eq!(table.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        assert_eq!(table[6], 4);
        // Walk the entries like smp_read_mpc.
        let (mut off, mut n) = (44, 0);
        while off < length {
            off += if table[off] == MP_PROCESSOR { 20 } else { 8 };
            n += 1;
        }
        assert_eq!(off, length);
        assert_eq!(n, u16::from_le_bytes([table[34], table[35]]));
        assert!(base as usize + mp.len() <= 0xa0000);
    }
}
