//! Decoding guest instructions with iced-x86, cached by address.
//!
//! The guest's own code never changes, but a guest whose return frame was smashed can run off
//! into data (stacks, zeroed pages), whose bytes differ from run to run. So every cached entry
//! keeps the bytes it was decoded from and is used only while memory still holds them, and the
//! cache is bounded: a run through a zeroed page would otherwise add an entry per two bytes.

use std::collections::HashMap;

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, Mnemonic, OpKind};

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
    /// `sysretq` (64-bit SYSRET): the return to ring 3 that is not an IRETQ.
    pub is_sysretq: bool,
    /// `swapgs`.
    pub is_swapgs: bool,
    /// A ring-3 point's write ([`is_ring3_point`]).
    pub is_ring3_point: bool,
}

/// Most instructions the cache keeps: the whole guest has about 7,000, of which a run steps
/// through a few hundred. Past it the cache starts over (keeping its allocation, about 0.8 MiB).
const MAX_CACHED: usize = 1 << 13;

/// A cache of decoded guest instructions.
pub struct InsnCache {
    /// Each instruction with the bytes it was decoded from.
    insns: HashMap<u64, (Insn, Bytes)>,
}

impl Default for InsnCache {
    /// An empty cache with room for [`MAX_CACHED`] instructions from the start. Grown on
    /// demand, it doubled its table as hostile guests ran through new addresses, in steps of
    /// up to 0.4 MiB tens of thousands of runs apart: a long soak's resident memory crept up
    /// for hours before it reached its bound. Reserved, the bound is there from the first run.
    fn default() -> Self {
        Self { insns: HashMap::with_capacity(MAX_CACHED) }
    }
}

/// The bytes at an address, as many as memory has (up to [`MAX_INSN_LEN`]).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Bytes {
    buf: [u8; MAX_INSN_LEN],
    len: usize,
}

impl Bytes {
    fn read(ram: &GuestRam, rip: u64) -> Result<Self> {
        let mut buf = [0u8; MAX_INSN_LEN];
        // Near the end of memory fewer bytes are readable; outside it, none.
        let len = (ram.size().saturating_sub(rip) as usize).min(MAX_INSN_LEN);
        if len > 0 {
            ram.read(rip, &mut buf[..len])?;
        }
        Ok(Self { buf, len })
    }

    fn get(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl InsnCache {
    /// The instruction at `rip`.
    pub fn get(&mut self, ram: &GuestRam, rip: u64) -> Result<Insn> {
        let bytes = Bytes::read(ram, rip)?;
        if let Some((insn, seen)) = self.insns.get(&rip)
            && *seen == bytes
        {
            return Ok(*insn);
        }
        let decoded = decode(rip, &bytes);
        let insn = Insn {
            len: decoded.len() as u8,
            is_iretq: decoded.mnemonic() == Mnemonic::Iretq,
            is_rep_string: decoded.is_string_instruction()
                && (decoded.has_rep_prefix() || decoded.has_repne_prefix()),
            is_int3: decoded.mnemonic() == Mnemonic::Int3,
            is_sysretq: decoded.mnemonic() == Mnemonic::Sysretq,
            is_swapgs: decoded.mnemonic() == Mnemonic::Swapgs,
            is_ring3_point: is_ring3_point(&decoded),
            is_out: matches!(
                decoded.mnemonic(),
                Mnemonic::Out | Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd
            ),
        };
        if self.insns.len() >= MAX_CACHED {
            self.insns.clear();
        }
        self.insns.insert(rip, (insn, bytes));
        Ok(insn)
    }
}

/// Decodes the instruction `bytes` hold at `rip`. A guest that jumped outside its memory (a
/// smashed return frame) has no bytes there at all: that is an invalid instruction, which the
/// CPU, not the engine, will fault on.
fn decode(rip: u64, bytes: &Bytes) -> Instruction {
    if bytes.len == 0 {
        return Instruction::default();
    }
    Decoder::with_ip(64, bytes.get(), rip, DecoderOptions::NONE).decode()
}

/// The instruction at `rip` in Intel syntax, for traces.
pub fn disassemble(ram: &GuestRam, rip: u64) -> String {
    match Bytes::read(ram, rip).map(|bytes| decode(rip, &bytes)) {
        Ok(insn) if !insn.is_invalid() => {
            let mut text = String::new();
            IntelFormatter::new().format(&insn, &mut text);
            text
        }
        _ => "(undecodable)".into(),
    }
}

/// Whether `insn` is a ring-3 point's write: a store to `nmifuzz_abi::USER_POINT_ADDRESS`, where
/// there is no memory, so that its MMIO exit is the boundary after it (docs/engine.md, "Ring 3").
pub fn is_ring3_point(insn: &Instruction) -> bool {
    insn.op0_kind() == OpKind::Memory
        && insn.memory_displacement64() == nmifuzz_abi::USER_POINT_ADDRESS
}
