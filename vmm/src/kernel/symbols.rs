//! A real kernel's symbols: from a System.map, or from the kernel itself (`/proc/kallsyms`,
//! which the agent hands over at boot).
//!
//! Debian ships a stub System.map (one line saying the real one is in the -dbg package), so a
//! map is only used when it looks like one; otherwise the kernel's own table is, and
//! [`Symbols::source`] says which.

use std::path::Path;

use crate::error::{Error, Result};

/// A map with fewer symbols than this is a stub, not a kernel's symbol table.
const MIN_SYMBOLS: usize = 1000;

/// Where symbols came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SymbolSource {
    /// A System.map file.
    SystemMap(String),
    /// The running kernel's `/proc/kallsyms`.
    Kallsyms,
}

impl std::fmt::Display for SymbolSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SystemMap(path) => write!(f, "{path}"),
            Self::Kallsyms => write!(f, "the kernel's /proc/kallsyms"),
        }
    }
}

/// A symbol table sorted by address.
#[derive(Clone, Debug)]
pub struct Symbols {
    /// (address, type letter, name), sorted by address then name.
    entries: Vec<(u64, char, String)>,
    source: SymbolSource,
}

impl Symbols {
    /// Parses `nm`-style text (`ffffffff81c01650 T asm_exc_nmi`, kallsyms may add a module).
    pub fn parse(text: &str, source: SymbolSource) -> Self {
        let mut entries: Vec<(u64, char, String)> = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let address = u64::from_str_radix(fields.next()?, 16).ok()?;
                let kind = fields.next()?.chars().next()?;
                let name = fields.next()?;
                Some((address, kind, name.to_owned()))
            })
            .collect();
        entries.sort();
        Self { entries, source }
    }

    /// The symbols of a System.map, or `None` (with the reason) if it is a stub.
    pub fn from_system_map(path: &Path) -> Result<std::result::Result<Self, String>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Kernel(format!("cannot read the System.map {}: {e}", path.display()))
        })?;
        let symbols = Self::parse(&text, SymbolSource::SystemMap(path.display().to_string()));
        if symbols.len() >= MIN_SYMBOLS {
            return Ok(Ok(symbols));
        }
        let first = text.lines().next().unwrap_or("").trim();
        Ok(Err(format!(
            "{} has {} symbols, so it is a stub{}",
            path.display(),
            symbols.len(),
            if first.is_empty() { String::new() } else { format!(" (it says: {first:.120})") }
        )))
    }

    /// How many symbols.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Where they came from.
    pub fn source(&self) -> &SymbolSource {
        &self.source
    }

    /// The address of `name`.
    pub fn address(&self, name: &str) -> Option<u64> {
        self.entries.iter().find(|(_, _, n)| n == name).map(|(a, _, _)| *a)
    }

    /// The address of `name`, or an error naming what the campaign needs it for.
    pub fn require(&self, name: &str, purpose: &str) -> Result<u64> {
        self.address(name).ok_or_else(|| {
            Error::Kernel(format!(
                "the kernel's symbols ({}) have no `{name}`, which nmifuzz needs for {purpose}",
                self.source
            ))
        })
    }

    /// Whether a global code symbol (type `T`) starts at `address`.
    pub fn is_global_text(&self, address: u64) -> bool {
        let from = self.entries.partition_point(|(a, _, _)| *a < address);
        self.entries[from..].iter().take_while(|(a, _, _)| *a == address).any(|(_, k, _)| *k == 'T')
    }

    /// The code symbol containing `address`, and the offset into it.
    pub fn locate(&self, address: u64) -> Option<(&str, u64)> {
        let index = self.entries.partition_point(|(a, _, _)| *a <= address);
        let (start, _, name) = self.entries[..index]
            .iter()
            .rev()
            .find(|(_, kind, _)| matches!(kind, 't' | 'T' | 'w' | 'W'))?;
        (address - start < 0x10_0000).then_some((name.as_str(), address - start))
    }

    /// `symbol+0xoffset`, or the bare address.
    pub fn describe(&self, address: u64) -> String {
        match self.locate(address) {
            Some((name, 0)) => name.to_owned(),
            Some((name, offset)) => format!("{name}+{offset:#x}"),
            None => format!("{address:#x}"),
        }
    }

    /// Resolves `symbol+0xoffset` (or `symbol+offset` in decimal, or a bare symbol).
    pub fn resolve(&self, point: &str) -> Result<u64> {
        let (name, offset) = match point.split_once('+') {
            Some((name, offset)) => {
                let parsed = match offset.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => offset.parse(),
                };
                let offset = parsed.map_err(|_| {
                    Error::Kernel(format!("point `{point}`: `{offset}` is not an offset"))
                })?;
                (name, offset)
            }
            None => (point, 0),
        };
        let base = self.address(name).ok_or_else(|| {
            Error::Kernel(format!("point `{point}`: the kernel has no symbol `{name}`"))
        })?;
        Ok(base + offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "ffffffff81c00080 T entry_SYSCALL_64\n\
                        ffffffff81c01650 T asm_exc_nmi\n\
                        ffffffff81c01785 t repeat_nmi\n\
                        ffffffff81c017aa t end_repeat_nmi\n\
                        ffffffff81c01800 T ignore_sysret\n\
                        0000000000031400 D irq_stat\n";

    #[test]
    fn points_resolve_and_addresses_locate() {
        let symbols = Symbols::parse(TEXT, SymbolSource::Kallsyms);
        assert_eq!(symbols.resolve("asm_exc_nmi+0x5d").unwrap(), 0xffffffff81c016ad);
        assert_eq!(symbols.resolve("asm_exc_nmi+16").unwrap(), 0xffffffff81c01660);
        assert_eq!(symbols.describe(0xffffffff81c01790), "repeat_nmi+0xb");
        assert_eq!(symbols.describe(0xffffffff81c01650), "asm_exc_nmi");
        assert!(symbols.is_global_text(0xffffffff81c01650));
        assert!(!symbols.is_global_text(0xffffffff81c01785), "repeat_nmi is local");
        assert_eq!(symbols.address("irq_stat"), Some(0x31400));
        assert!(symbols.resolve("nothing+1").unwrap_err().to_string().contains("no symbol"));
        assert!(symbols.resolve("asm_exc_nmi+zz").is_err());
    }

    #[test]
    fn a_stub_system_map_is_recognised() {
        let dir = std::env::temp_dir().join(format!("nmifuzz-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("System.map");
        std::fs::write(
            &path,
            "ffffffffffffffff B The real System.map is in the linux-image-6.1-dbg package\n",
        )
        .unwrap();
        let reason = Symbols::from_system_map(&path).unwrap().unwrap_err();
        assert!(reason.contains("stub") && reason.contains("real System.map"), "{reason}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
