//! The guest image: validating and loading the guest ELF, and its symbols.
//!
//! linux-loader copies each `PT_LOAD` segment's file bytes to its physical address; it neither
//! checks where segments land nor zeroes their `.bss` tails, so both are done here.

use std::io::Cursor;

use linux_loader::loader::{KernelLoader, elf::Elf};
use object::elf::{EM_X86_64, PT_LOAD};
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{Endianness, Object, ObjectSymbol, SymbolKind};
use vm_memory::GuestAddress;

use crate::error::{Error, Result};
use crate::layout::KERNEL_MIN;
use crate::memory::GuestRam;

/// One symbol of the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    /// Its name.
    pub name: String,
    /// Its address.
    pub address: u64,
    /// Its size in bytes; 0 for assembly labels without a `.size`.
    pub size: u64,
}

/// A validated guest ELF: where it loads, where it starts, and its symbols.
#[derive(Clone, Debug)]
pub struct GuestImage {
    bytes: Vec<u8>,
    entry: u64,
    /// `(paddr, filesz, memsz)` of each loadable segment.
    segments: Vec<(u64, u64, u64)>,
    /// Sorted by address.
    symbols: Vec<Symbol>,
    /// Untyped symbols, such as the linker script's markers: named, but never used to
    /// symbolize an address (they share addresses with the code they delimit).
    markers: Vec<(String, u64)>,
    hash: u64,
}

impl GuestImage {
    /// Parses and validates `bytes` for a guest memory of `mem_size` bytes: a 64-bit x86-64
    /// executable whose loadable segments lie between [`KERNEL_MIN`] and the end of memory.
    pub fn parse(bytes: Vec<u8>, mem_size: u64) -> Result<Self> {
        let elf = ElfFile64::<Endianness>::parse(&*bytes)
            .map_err(|e| Error::BadElf(format!("not a 64-bit ELF file: {e}")))?;
        let endian = elf.endian();
        let header = elf.elf_header();
        if header.e_machine(endian) != EM_X86_64 {
            return Err(Error::BadElf(format!(
                "machine type {} is not x86-64 ({EM_X86_64})",
                header.e_machine(endian)
            )));
        }
        if endian != Endianness::Little {
            return Err(Error::BadElf("big-endian ELF".into()));
        }
        let mut segments = Vec::new();
        for (i, ph) in elf.elf_program_headers().iter().enumerate() {
            if ph.p_type(endian) != PT_LOAD {
                continue;
            }
            let (paddr, filesz, memsz) =
                (ph.p_paddr(endian), ph.p_filesz(endian), ph.p_memsz(endian));
            let end = paddr.checked_add(memsz).filter(|_| filesz <= memsz);
            match end {
                Some(end) if paddr >= KERNEL_MIN && end <= mem_size => {
                    segments.push((paddr, filesz, memsz))
                }
                Some(end) if paddr < KERNEL_MIN => {
                    return Err(Error::BadElf(format!(
                        "segment {i} at [{paddr:#x}, {end:#x}) overlaps the VMM's reserved \
                         area below {KERNEL_MIN:#x}"
                    )));
                }
                Some(end) => {
                    return Err(Error::BadElf(format!(
                        "segment {i} at [{paddr:#x}, {end:#x}) does not fit in {mem_size:#x} \
                         bytes of guest memory"
                    )));
                }
                None => return Err(Error::BadElf(format!("segment {i} has impossible sizes"))),
            }
        }
        if segments.is_empty() {
            return Err(Error::BadElf("no loadable segment".into()));
        }
        let entry = header.e_entry(endian);
        if !segments.iter().any(|&(p, _, m)| (p..p + m).contains(&entry)) {
            return Err(Error::BadElf(format!("entry point {entry:#x} is not in any segment")));
        }
        let mut symbols: Vec<Symbol> = elf
            .symbols()
            .filter(|s| matches!(s.kind(), SymbolKind::Text | SymbolKind::Data | SymbolKind::Label))
            .filter(|s| s.address() != 0)
            .filter_map(|s| {
                let name = s.name().ok()?;
                (!name.is_empty() && !name.starts_with(".L") && !name.starts_with('$')).then(|| {
                    // `{:#}` leaves out the hash suffix of Rust's mangled names.
                    let name = format!("{:#}", rustc_demangle::demangle(name));
                    Symbol { name, address: s.address(), size: s.size() }
                })
            })
            .collect();
        symbols.sort_by(|a, b| a.address.cmp(&b.address).then(b.size.cmp(&a.size)));
        let markers = elf
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Unknown && !s.is_undefined() && s.address() != 0)
            .filter_map(|s| Some((s.name().ok()?.to_owned(), s.address())))
            .collect();
        let hash = fnv1a(&bytes);
        Ok(Self { bytes, entry, segments, symbols, markers, hash })
    }

    /// Copies the segments into `ram` and zeroes their `.bss` tails.
    pub fn load(&self, ram: &mut GuestRam) -> Result<()> {
        let mut cursor = Cursor::new(&self.bytes[..]);
        Elf::load(ram.mmap(), None, &mut cursor, Some(GuestAddress(KERNEL_MIN)))
            .map_err(|e| Error::BadElf(format!("loading failed: {e}")))?;
        for &(paddr, filesz, memsz) in &self.segments {
            ram.zero(paddr + filesz, memsz - filesz)?;
        }
        Ok(())
    }

    /// The entry point.
    pub fn entry(&self) -> u64 {
        self.entry
    }

    /// A 64-bit FNV-1a hash of the ELF file; artifacts record it so replays can tell when the
    /// guest changed.
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// All symbols, sorted by address.
    pub fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    /// The address of the symbol `name`.
    pub fn symbol(&self, name: &str) -> Result<u64> {
        self.symbols
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.address)
            .ok_or_else(|| Error::MissingSymbol(name.to_owned()))
    }

    /// The address of the linker-script marker `name` (an untyped symbol, see `guest/link.ld`).
    pub fn marker(&self, name: &str) -> Result<u64> {
        self.markers
            .iter()
            .find(|(marker, _)| marker == name)
            .map(|&(_, address)| address)
            .ok_or_else(|| Error::MissingSymbol(name.to_owned()))
    }

    /// The closest symbol at or below `addr` that contains it, and the offset into it. A sized
    /// symbol contains its `size` bytes; a sizeless assembly label contains everything from
    /// its address up to the next symbol's, or to the end of the image for the last one, so
    /// that an address far outside the guest (a wild RIP) is named by no symbol.
    pub fn locate(&self, addr: u64) -> Option<(&Symbol, u64)> {
        let above = self.symbols.partition_point(|s| s.address <= addr);
        let below = &self.symbols[..above];
        let nearest = below.last()?.address;
        let inside_image = above < self.symbols.len() || addr < self.end();
        below
            .iter()
            .rev()
            .find(|s| match s.size {
                0 => s.address == nearest && inside_image,
                size => addr - s.address < size,
            })
            .map(|s| (s, addr - s.address))
    }

    /// The end of the highest loadable segment.
    fn end(&self) -> u64 {
        self.segments.iter().map(|&(paddr, _, memsz)| paddr + memsz).max().unwrap_or(0)
    }

    /// `symbol+0xoff` for `addr`, or the bare hex address if no symbol covers it.
    pub fn symbolize(&self, addr: u64) -> String {
        match self.locate(addr) {
            Some((s, 0)) => s.name.clone(),
            Some((s, off)) => format!("{}+{off:#x}", s.name),
            None => format!("{addr:#x}"),
        }
    }
}

/// The image fingerprint: the shared FNV-1a of [`crate::hash`].
fn fnv1a(bytes: &[u8]) -> u64 {
    crate::hash::fnv1a(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EMBEDDED_GUEST;

    fn guest() -> GuestImage {
        GuestImage::parse(EMBEDDED_GUEST.to_vec(), 16 << 20).expect("the embedded guest parses")
    }

    #[test]
    fn a_sizeless_label_ends_at_the_next_symbol_and_the_last_at_the_image_end() {
        let image = guest();
        let labels: Vec<_> = image.symbols().iter().filter(|s| s.size == 0).collect();
        let label = labels.first().expect("the entry has assembly labels");
        assert_eq!(image.symbolize(label.address), label.name);
        assert_eq!(image.symbolize(label.address + 1), format!("{}+0x1", label.name));
        // Past the image's end, beyond every symbol, no label claims an address.
        let wild = image.end() + 0x1000_0000;
        assert_eq!(image.locate(wild).map(|(s, _)| s.name.as_str()), None);
        assert_eq!(image.symbolize(wild), format!("{wild:#x}"));
        // In the padding after a function, before the next symbol, no label further down
        // claims the address either.
        let gap = image
            .symbols()
            .windows(2)
            .find(|w| w[0].size > 0 && w[0].address + w[0].size < w[1].address)
            .map(|w| w[0].address + w[0].size)
            .expect("functions are aligned, with padding between some of them");
        assert_eq!(image.symbolize(gap), format!("{gap:#x}"));
    }
}
