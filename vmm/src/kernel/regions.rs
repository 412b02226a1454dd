//! The kernel's entry code as instructions, decoded from guest memory: where NMIs may be
//! placed.

use iced_x86::{Decoder, DecoderOptions, FlowControl};

use super::KernelVm;
use crate::error::{Error, Result};

/// How far a region may reach from its symbol.
const MAX_REGION_BYTES: usize = 0x600;

impl KernelVm {
    /// The addresses of the instructions from the symbol `name` on: at most `max`, up to the
    /// next global function, and up to the first `call` when `stop_at_call` is set.
    pub fn instructions(&self, name: &str, max: usize, stop_at_call: bool) -> Result<Vec<u64>> {
        let start = self.symbols.require(name, "placing NMIs in the entry code")?;
        let bytes = self
            .read_virtual(start, MAX_REGION_BYTES)
            .ok_or_else(|| Error::Kernel(format!("cannot read {name} in guest memory")))?;
        let mut decoder = Decoder::with_ip(64, &bytes, start, DecoderOptions::NONE);
        let mut addresses = Vec::new();
        while decoder.can_decode() && addresses.len() < max {
            let insn = decoder.decode();
            if !addresses.is_empty() && self.symbols.is_global_text(insn.ip()) {
                break; // another function starts
            }
            addresses.push(insn.ip());
            if stop_at_call && insn.flow_control() == FlowControl::Call {
                break;
            }
        }
        Ok(addresses)
    }
}
