//! The guest's instruction table: every instruction of the code an NMI schedule is about (the
//! NMI-handling code of one entry, the exception paths, the workload loop and the kernel side of
//! ring 3), decoded with iced-x86 and named as `symbol+offset`, plus the ring-3 points (the
//! boundary after each of the user workload's point writes: ring 3 has no other boundaries the
//! engine stops at). Symbolic points are drawn from it, so a point is always a boundary.

use std::ops::Range;

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic};

use super::decode;

use crate::error::Result;
use crate::image::{GuestImage, Symbol};
use crate::memory::GuestRam;

/// Code outside the NMI-handling range that schedules place NMIs in: the exception paths
/// `do_nmi`'s faults take (and the user's system calls enter by) and the workload loop the
/// NMIs interrupt. The kernel side of ring 3 is a range of its own (`ENTRY_USER_START`).
const OTHER_PATHS: &[&str] = &["exception_common", "exception_dispatch", "workload_loop"];

/// One instruction of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInsn {
    /// The sized symbol it lies in.
    pub symbol: String,
    /// Bytes into the symbol.
    pub offset: u64,
    /// Its address.
    pub address: u64,
}

/// The instructions of the paths, in address order (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct InstructionTable {
    insns: Vec<TableInsn>,
}

impl InstructionTable {
    /// Decodes the NMI-handling code reached with the entry named `entry_symbol` (that entry,
    /// `do_nmi` and everything else in the range except the other entries, which are named
    /// `nmi_<variant>`), the exception paths and the workload loop.
    ///
    /// `rep` string instructions are left out: the stepped engine stops inside them several
    /// times at the same RIP, so "the n-th time it is reached" would mean something else to a
    /// breakpoint.
    pub fn build(image: &GuestImage, ram: &GuestRam, entry_symbol: &str) -> Result<Self> {
        let entries: Vec<&str> =
            nmifuzz_abi::Variant::ALL.iter().map(|v| v.entry_symbol()).collect();
        let mut insns = Vec::new();
        for_each_path_insn(image, ram, |symbol, insn| {
            let another_entry =
                entries.contains(&symbol.name.as_str()) && symbol.name != entry_symbol;
            let rep =
                insn.is_string_instruction() && (insn.has_rep_prefix() || insn.has_repne_prefix());
            if !another_entry && !rep {
                insns.push(TableInsn {
                    symbol: symbol.name.clone(),
                    offset: insn.ip() - symbol.address,
                    address: insn.ip(),
                });
            }
        })?;
        // Ring-3 points: the boundary after each of the user workload's point writes.
        let user_text = image.marker(nmifuzz_abi::USER_TEXT_START)?
            ..image.marker(nmifuzz_abi::USER_TEXT_END)?;
        for_each_insn_in(image, ram, user_text, |symbol, insn| {
            if decode::is_ring3_point(insn) {
                insns.push(TableInsn {
                    symbol: symbol.name.clone(),
                    offset: insn.next_ip() - symbol.address,
                    address: insn.next_ip(),
                });
            }
        })?;
        insns.sort_by_key(|i| i.address);
        insns.dedup_by_key(|i| i.address);
        Ok(Self { insns })
    }

    /// A table of `insns` (sorted by address here), for callers that make their own.
    pub fn from_insns(mut insns: Vec<TableInsn>) -> Self {
        insns.sort_by_key(|i| i.address);
        Self { insns }
    }

    /// The instructions, in address order.
    pub fn insns(&self) -> &[TableInsn] {
        &self.insns
    }

    /// The position of the instruction at `symbol+offset`, if the table has it.
    pub fn position(&self, symbol: &str, offset: u64) -> Option<usize> {
        self.insns.iter().position(|i| i.symbol == symbol && i.offset == offset)
    }
}

/// The addresses of every IRETQ on the paths (of every entry), where NMI handling returns.
pub fn iretq_sites(image: &GuestImage, ram: &GuestRam) -> Result<Vec<u64>> {
    let mut sites = Vec::new();
    for_each_path_insn(image, ram, |_, insn| {
        if insn.mnemonic() == Mnemonic::Iretq {
            sites.push(insn.ip());
        }
    })?;
    sites.sort_unstable();
    sites.dedup();
    Ok(sites)
}

/// Calls `f` with every valid instruction of the paths: the sized symbols in the NMI-handling
/// range and those of [`OTHER_PATHS`], each decoded from its start, and the kernel side of
/// ring 3, decoded as one run of assembly.
fn for_each_path_insn(
    image: &GuestImage,
    ram: &GuestRam,
    mut f: impl FnMut(&Symbol, &Instruction),
) -> Result<()> {
    let entry_user =
        image.marker(nmifuzz_abi::ENTRY_USER_START)?..image.marker(nmifuzz_abi::ENTRY_USER_END)?;
    for_each_insn_in(image, ram, entry_user, &mut f)?;
    let nmi_code =
        image.marker(nmifuzz_abi::NMI_CODE_START)?..image.marker(nmifuzz_abi::NMI_CODE_END)?;
    for symbol in image.symbols().iter().filter(|s| s.size > 0) {
        if !nmi_code.contains(&symbol.address) && !OTHER_PATHS.contains(&symbol.name.as_str()) {
            continue;
        }
        let mut bytes = vec![0; symbol.size as usize];
        ram.read(symbol.address, &mut bytes)?;
        let mut decoder = Decoder::with_ip(64, &bytes, symbol.address, DecoderOptions::NONE);
        for insn in &mut decoder {
            if !insn.is_invalid() {
                f(symbol, &insn);
            }
        }
    }
    Ok(())
}

/// Calls `f` with every valid instruction of the assembly in `range`, decoded from its start,
/// and the symbol it lies in (sizeless labels included).
fn for_each_insn_in(
    image: &GuestImage,
    ram: &GuestRam,
    range: Range<u64>,
    mut f: impl FnMut(&Symbol, &Instruction),
) -> Result<()> {
    let mut bytes = vec![0; (range.end - range.start) as usize];
    ram.read(range.start, &mut bytes)?;
    for insn in &mut Decoder::with_ip(64, &bytes, range.start, DecoderOptions::NONE) {
        if let Some((symbol, _)) = image.locate(insn.ip())
            && !insn.is_invalid()
        {
            f(symbol, &insn);
        }
    }
    Ok(())
}
