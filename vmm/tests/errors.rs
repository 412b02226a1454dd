//! Errors a user can run into before any guest code runs: a bad guest ELF, a missing KVM.

use std::path::PathBuf;

use vmm::{Error, Vm, VmConfig};

/// The embedded guest with `patch` applied to a copy of its bytes.
fn patched(patch: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut elf = vmm::EMBEDDED_GUEST.to_vec();
    patch(&mut elf);
    elf
}

fn boot_error(elf: Vec<u8>) -> String {
    match Vm::new(&VmConfig::default(), elf) {
        Ok(_) => panic!("a bad ELF booted"),
        Err(e @ Error::BadElf(_)) => e.to_string(),
        Err(e) => panic!("expected a BadElf error, got: {e}"),
    }
}

/// Offset of the first program header and its size, from the ELF header.
fn first_phdr(elf: &[u8]) -> usize {
    u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize
}

#[test]
fn not_an_elf_is_refused() {
    let msg = boot_error(b"#!/bin/sh\necho not a kernel\n".to_vec());
    assert!(msg.contains("not a 64-bit ELF"), "{msg}");
}

#[test]
fn wrong_machine_is_refused() {
    // e_machine at offset 0x12: 0x28 is ARM.
    let msg = boot_error(patched(|e| e[0x12] = 0x28));
    assert!(msg.contains("not x86-64"), "{msg}");
}

#[test]
fn segment_in_the_reserved_area_is_refused() {
    let msg = boot_error(patched(|e| {
        // Move every PT_LOAD's physical address (p_paddr at +0x18) to 0x1000.
        let (phoff, phnum) = (first_phdr(e), u16::from_le_bytes([e[0x38], e[0x39]]) as usize);
        for i in 0..phnum {
            let ph = phoff + i * 0x38;
            if e[ph..ph + 4] == [1, 0, 0, 0] {
                e[ph + 0x18..ph + 0x20].copy_from_slice(&0x1000u64.to_le_bytes());
            }
        }
    }));
    assert!(msg.contains("reserved area"), "{msg}");
}

#[test]
fn segment_beyond_memory_is_refused() {
    let config = VmConfig { memory: 4 << 20, ..VmConfig::default() };
    let elf = patched(|e| {
        let ph = first_phdr(e);
        // p_memsz of the first program header (at +0x28): far larger than guest memory.
        e[ph + 0x28..ph + 0x30].copy_from_slice(&(64u64 << 20).to_le_bytes());
    });
    let err = Vm::new(&config, elf).err().expect("must fail");
    assert!(
        err.to_string().contains("does not fit") || err.to_string().contains("segment"),
        "{err}"
    );
}

#[test]
fn missing_kvm_device_says_what_to_do() {
    let config = VmConfig { kvm_device: PathBuf::from("/nonexistent/kvm"), ..VmConfig::default() };
    let err = Vm::new(&config, vmm::EMBEDDED_GUEST.to_vec()).err().expect("must fail");
    assert!(matches!(err, Error::KvmMissing), "{err}");
    assert!(err.to_string().contains("modprobe"), "{err}");
}

#[test]
fn bad_memory_size_is_refused() {
    let config = VmConfig { memory: (16 << 20) + 4096, ..VmConfig::default() };
    let err = Vm::new(&config, vmm::EMBEDDED_GUEST.to_vec()).err().expect("must fail");
    assert!(matches!(err, Error::MemorySize(_)), "{err}");
}
