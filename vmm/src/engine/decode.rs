//! Decoding guest instructions with iced-x86, cached by address (guest code never changes).

use std::collections::HashMap;

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, Mnemonic};

use crate::error::Result;
use crate::memory::GuestRam;

/// The longest x86 instruction.
const MAX_INSN_LEN: usize = 15;

/// What the engine needs to know about one instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    /// Length in bytes.
    pub len: u8,
    /// `iretq` (64-bit operand size IRET).
    pub is_iretq: bool,
    /// A `rep`-prefixed string instruction, which KVM may stop inside of.
    pub is_rep_string: bool,
    /// `out` (port I/O write).
    pub is_out: bool,
    /// `int3`, a trap: it retires before its #BP is delivered.
    pub is_int3: bool,
}

/// A cache of decoded guest instructions.
#[derive(Default)]
pub struct InsnCache {
    insns: HashMap<u64, Insn>,
}

impl InsnCache {
    /// The instruction at `rip`.
    pub fn get(&mut self, ram: &GuestRam, rip: u64) -> Result<Insn> {
        if let Some(insn) = self.insns.get(&rip) {
            return Ok(*insn);
        }
        let decoded = decode(ram, rip)?;
        let insn = Insn {
            len: decoded.len() as u8,
            is_iretq: decoded.mnemonic() == Mnemonic::Iretq,
            is_rep_string: decoded.is_string_instruction()
                && (decoded.has_rep_prefix() || decoded.has_repne_prefix()),
            is_int3: decoded.mnemonic() == Mnemonic::Int3,
            is_out: matches!(
                decoded.mnemonic(),
                Mnemonic::Out | Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd
            ),
        };
        self.insns.insert(rip, insn);
        Ok(insn)
    }
}

fn decode(ram: &GuestRam, rip: u64) -> Result<Instruction> {
    let mut bytes = [0u8; MAX_INSN_LEN];
    // Near the end of memory fewer bytes are readable; decode what there is. A guest that jumped
    // outside its memory (a smashed return frame) has no bytes there at all: that is an invalid
    // instruction, which the CPU, not the engine, will fault on.
    let available = (ram.size().saturating_sub(rip) as usize).min(MAX_INSN_LEN);
    if available == 0 {
        return Ok(Instruction::default());
    }
    ram.read(rip, &mut bytes[..available])?;
    let mut decoder = Decoder::with_ip(64, &bytes[..available], rip, DecoderOptions::NONE);
    Ok(decoder.decode())
}

/// The instruction at `rip` in Intel syntax, for traces.
pub fn disassemble(ram: &GuestRam, rip: u64) -> String {
    match decode(ram, rip) {
        Ok(insn) if !insn.is_invalid() => {
            let mut text = String::new();
            IntelFormatter::new().format(&insn, &mut text);
            text
        }
        _ => "(undecodable)".into(),
    }
}
