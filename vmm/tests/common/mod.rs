//! Fixtures shared by the KVM integration tests.

use vmm::{Vm, VmConfig};

/// Environment variable that skips the tests needing `/dev/kvm`, for hosts without KVM. It must
/// be set explicitly: without it, a missing `/dev/kvm` fails every such test.
pub const SKIP_KVM: &str = "NMIFUZZ_SKIP_KVM_TESTS";

/// Boots the embedded guest, or returns `None` when the user opted out of KVM tests.
pub fn boot() -> Option<Vm> {
    if std::env::var_os(SKIP_KVM).is_some_and(|v| v == "1") {
        eprintln!("{SKIP_KVM}=1: skipping a test that needs /dev/kvm");
        return None;
    }
    match Vm::new(&VmConfig::default(), vmm::EMBEDDED_GUEST.to_vec()) {
        Ok(vm) => Some(vm),
        Err(e) => panic!(
            "this test needs a working /dev/kvm: {e}\n(set {SKIP_KVM}=1 to skip the KVM tests \
             explicitly on a host without KVM)"
        ),
    }
}

/// The embedded guest with `bytes` written over the code at `symbol` (+ `offset`), for tests
/// that need a guest misbehaving in one precise way.
#[allow(dead_code, reason = "not every test binary patches the guest")]
pub fn patched_guest(symbol: &str, offset: u64, bytes: &[u8]) -> Vec<u8> {
    use object::read::elf::{ElfFile64, ProgramHeader};
    let mut elf = vmm::EMBEDDED_GUEST.to_vec();
    let image = vmm::GuestImage::parse(elf.clone(), 16 << 20).unwrap();
    let address = image.symbol(symbol).unwrap() + offset;
    let file_offset = {
        let parsed = ElfFile64::<object::Endianness>::parse(&*elf).unwrap();
        let endian = parsed.endian();
        parsed
            .elf_program_headers()
            .iter()
            .find_map(|ph| {
                let (paddr, filesz) = (ph.p_paddr(endian), ph.p_filesz(endian));
                (paddr..paddr + filesz)
                    .contains(&address)
                    .then(|| (ph.p_offset(endian) + address - paddr) as usize)
            })
            .expect("the symbol is in a loaded segment")
    };
    elf[file_offset..file_offset + bytes.len()].copy_from_slice(bytes);
    elf
}

/// Boots `elf` instead of the embedded guest.
#[allow(dead_code, reason = "not every test binary patches the guest")]
pub fn boot_elf(elf: Vec<u8>) -> Option<Vm> {
    // Honour the opt-out and fail clearly without KVM, as `boot` does.
    boot()?;
    Some(Vm::new(&VmConfig::default(), elf).expect("the patched guest boots"))
}
