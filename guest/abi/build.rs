//! Discovers the NMI entries: every `entries/<stem>.rs` or `entries/<stem>.S` at the repository's
//! root is one entry, with no registration anywhere else (docs/entries.md).
//!
//! From each file's header comment this reads a one-line description and, optionally, a
//! `Layout:` line describing the entry's NMI stack; it checks what can be checked without
//! building (the name, the required entry symbol, the layout's geometry) and writes
//! `$OUT_DIR/entries.rs`: the table of entries that both the host and the guest see through
//! `nmifuzz_abi::Variant`, and the `include_entries!` macro with which the guest compiles them.
//! Every error names the file and what is wrong, and the build stops.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::{env, fs, process};

#[path = "src/entry_name.rs"]
#[allow(dead_code, reason = "the build uses only part of what nmifuzz new-entry shares")]
mod entry_name;

/// The entry `nmifuzz` uses when none is named.
const DEFAULT_STEM: &str = "linux";
/// Bytes of the CPU's NMI frame (RIP, CS, RFLAGS, RSP, SS), which it writes right below IST1's
/// top: the "original" frame of every layout is at `top - 40`.
const FRAME_BYTES: u64 = 40;
/// `NMI_STACK_SPAN` of the abi (checked against it in `lib.rs`).
const NMI_STACK_SPAN: u64 = 16 * 1024 - 16;

/// One discovered entry.
struct Entry {
    stem: String,
    path: PathBuf,
    kind: Kind,
    summary: String,
    layout: Option<[u64; 5]>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Rust with `global_asm!`, compiled as a module of the guest's `nmi` module.
    Rust,
    /// Plain assembly (GNU syntax directives, Intel-syntax instructions, `#` comments).
    Assembly,
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let dir = manifest.join("../../entries");
    println!("cargo:rerun-if-changed={}", dir.display());
    println!("cargo:rerun-if-changed=src/entry_name.rs");
    let dir = fs::canonicalize(&dir).unwrap_or_else(|e| {
        fail(&format!("{}: cannot open the entries directory: {e}", dir.display()))
    });
    let entries = discover(&dir).unwrap_or_else(|e| fail(&e));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("entries.rs");
    fs::write(&out, generate(&entries))
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", out.display())));
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    process::exit(1);
}

/// Every entry in `dir`, the default first, then by name.
fn discover(dir: &Path) -> Result<Vec<Entry>, String> {
    let listing = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut entries = Vec::new();
    for item in listing {
        let path = item.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        let kind = match path.extension().and_then(|e| e.to_str()) {
            Some("rs") => Kind::Rust,
            Some("S") => Kind::Assembly,
            // READMEs, editor backups and the like.
            _ => continue,
        };
        println!("cargo:rerun-if-changed={}", path.display());
        let entry = read_entry(&path, kind)?;
        if kind == Kind::Assembly {
            check_assembles(&path)?;
        }
        entries.push(entry);
    }
    entries
        .sort_by(|a, b| (a.stem != DEFAULT_STEM, &a.stem).cmp(&(b.stem != DEFAULT_STEM, &b.stem)));
    if let Some(twins) = entries.windows(2).find(|w| w[0].stem == w[1].stem) {
        return Err(format!(
            "{} and {}: two entries with the same name",
            twins[0].path.display(),
            twins[1].path.display()
        ));
    }
    if entries.first().is_none_or(|e| e.stem != DEFAULT_STEM) {
        return Err(format!(
            "{}: no `{DEFAULT_STEM}.rs` or `{DEFAULT_STEM}.S`, the default entry",
            dir.display()
        ));
    }
    Ok(entries)
}

fn read_entry(path: &Path, kind: Kind) -> Result<Entry, String> {
    let at = path.display();
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
    entry_name::check_stem(&stem).map_err(|e| format!("{at}: {e}"))?;
    let text = fs::read_to_string(path).map_err(|e| format!("{at}: cannot read: {e}"))?;
    let header = header_comment(&text, kind);
    let summary = header.iter().find(|l| !l.is_empty()).cloned().ok_or_else(|| {
        let marker = if kind == Kind::Rust { "//!" } else { "#" };
        format!(
            "{at}: the file must start with a comment (`{marker} ...`) whose first line \
             describes the entry; `nmifuzz variants` shows it"
        )
    })?;
    let symbol = entry_name::symbol_of(&stem);
    if !defines(&text, &symbol) {
        return Err(format!(
            "{at}: missing required symbol `{symbol}`: the entry must define the label \
             `{symbol}:` (the NMI gate points there; see docs/entries.md)"
        ));
    }
    let layout = match header.iter().find_map(|l| l.strip_prefix("Layout:")) {
        None => None,
        Some(value) => parse_layout(value.trim()).map_err(|e| format!("{at}: Layout: {e}"))?,
    };
    Ok(Entry { stem, path: path.to_owned(), kind, summary, layout })
}

/// Assembles `path` on its own with the system's GNU assembler, if there is one, so that a
/// mistake is reported with the file and line: inside the guest's `global_asm!`, LLVM would
/// name only a line of the whole concatenated assembly. (The guest build's own assembler has
/// the last word; the two agree on the plain Intel-syntax code entries are written in.)
fn check_assembles(path: &Path) -> Result<(), String> {
    let output = process::Command::new("as")
        .args(["--64", "-msyntax=intel", "-mnaked-reg", "-o", "/dev/null"])
        .arg(path)
        .output();
    match output {
        // No assembler: the guest build still reports the error, only less precisely.
        Err(_) => Ok(()),
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{} does not assemble:\n{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        )),
    }
}

/// The leading comment lines, without their markers: `//!` for Rust, `#` for assembly.
fn header_comment(text: &str, kind: Kind) -> Vec<String> {
    let marker = if kind == Kind::Rust { "//!" } else { "#" };
    text.lines()
        .map(str::trim)
        .take_while(|l| l.starts_with(marker))
        .map(|l| l[marker.len()..].trim().to_owned())
        .collect()
}

/// Whether the entry's text defines `symbol`: as a label (`nmi_x:`), or as the name passed to
/// the shared pieces of `guest/src/nmi/pieces.rs` (`nmi_prologue!("nmi_x")`).
fn defines(text: &str, symbol: &str) -> bool {
    text.lines().any(|line| {
        let line = line.trim();
        line.starts_with(&format!("{symbol}:")) || line.contains(&format!("(\"{symbol}\")"))
    })
}

/// `none`, `linux`, or `original=40 temp_rdx=48 executing=56 iret=96 outermost=136` (byte
/// offsets below IST1's top), checked for a geometry the code can have.
fn parse_layout(value: &str) -> Result<Option<[u64; 5]>, String> {
    const NAMES: [&str; 5] = ["original", "temp_rdx", "executing", "iret", "outermost"];
    let offsets = match value {
        "none" => return Ok(None),
        "linux" => [40, 48, 56, 96, 136],
        _ => {
            let mut offsets = [None; 5];
            for pair in value.split_whitespace() {
                let (key, number) =
                    pair.split_once('=').ok_or_else(|| format!("`{pair}` is not `name=offset`"))?;
                let slot = NAMES.iter().position(|n| *n == key).ok_or_else(|| {
                    format!("unknown field `{key}` (fields: {})", NAMES.join(", "))
                })?;
                offsets[slot] =
                    Some(number.parse::<u64>().map_err(|_| format!("`{number}` is not a number"))?);
            }
            let mut complete = [0; 5];
            for (i, offset) in offsets.iter().enumerate() {
                complete[i] = offset.ok_or_else(|| format!("`{}` is missing", NAMES[i]))?;
            }
            complete
        }
    };
    if offsets[0] != FRAME_BYTES {
        return Err(format!(
            "original={} contradicts the CPU, which writes the NMI frame at IST1 top - {FRAME_BYTES}",
            offsets[0]
        ));
    }
    // Each field's byte range below the top: frames are 40 bytes, the two slots 8.
    let sizes = [FRAME_BYTES, 8, 8, FRAME_BYTES, FRAME_BYTES];
    for (i, (&offset, &size)) in offsets.iter().zip(&sizes).enumerate() {
        if offset % 8 != 0 || offset < size || offset > NMI_STACK_SPAN {
            return Err(format!(
                "{}={offset} must be a multiple of 8 between {size} and {NMI_STACK_SPAN}",
                NAMES[i]
            ));
        }
        for j in 0..i {
            let (a, b) = ((offset - size)..offset, (offsets[j] - sizes[j])..offsets[j]);
            if a.start < b.end && b.start < a.end {
                return Err(format!("{} and {} overlap", NAMES[j], NAMES[i]));
            }
        }
    }
    Ok(Some(offsets))
}

/// The generated Rust: the table, the `Variant` constants, and `include_entries!`.
fn generate(entries: &[Entry]) -> String {
    let mut out = format!(
        "// @generated by guest/abi/build.rs from the files in entries/: do not edit.\n\n\
         /// The span the layouts were checked against (must be `NMI_STACK_SPAN`).\n\
         const CHECKED_NMI_STACK_SPAN: u64 = {NMI_STACK_SPAN};\n\n\
         /// Every entry in `entries/`, the default first, then by name.\n\
         const ENTRIES: &[EntryInfo] = &[\n",
    );
    for entry in entries {
        let layout = entry.layout.map_or_else(
            || "None".to_owned(),
            |[original, temp_rdx, executing, iret, outermost]| {
                format!(
                    "Some(NmiStackLayout {{ original: {original}, temp_rdx: {temp_rdx}, \
                     executing: {executing}, iret: {iret}, outermost: {outermost} }})"
                )
            },
        );
        let file = format!("entries/{}", entry.path.file_name().unwrap().to_string_lossy());
        writeln!(
            out,
            "    EntryInfo {{ name: {:?}, symbol: {:?}, summary: {:?}, file: {file:?}, layout: {layout} }},",
            entry_name::name_of(&entry.stem),
            entry_name::symbol_of(&entry.stem),
            entry.summary,
        )
        .unwrap();
    }
    out.push_str("];\n\nimpl Variant {\n");
    for (code, entry) in entries.iter().enumerate() {
        writeln!(
            out,
            "    /// `{}`: {}\n    pub const {}: Self = Self({code});",
            entry.path.file_name().unwrap().to_string_lossy(),
            entry.summary.replace('`', "'"),
            entry.stem.to_ascii_uppercase()
        )
        .unwrap();
    }
    let all: Vec<String> = (0..entries.len()).map(|code| format!("Self({code})")).collect();
    writeln!(
        out,
        "    /// Every entry, the default first, then by name.\n    \
         pub const ALL: &'static [Self] = &[{}];\n}}\n",
        all.join(", ")
    )
    .unwrap();

    // The guest's half: the entries' code and their addresses, by code.
    out.push_str(
        "/// Compiles every entry into the guest and defines `entry_addresses()`, their addresses by\n\
         /// code. Invoked once, in the guest's `nmi` module.\n\
         #[doc(hidden)]\n#[macro_export]\nmacro_rules! include_entries {\n    () => {\n\
         // In a module of their own, so that no entry's name can collide with the guest's.\n\
         mod entries {\n",
    );
    for entry in entries {
        let path = entry.path.display().to_string();
        match entry.kind {
            Kind::Rust => writeln!(out, "        #[path = {path:?}]\n        mod {};", entry.stem),
            // Each assembly entry gets its own section, inside the NMI-handling code (link.ld),
            // and is taken raw: braces in its text are not format placeholders.
            Kind::Assembly => writeln!(
                out,
                "        core::arch::global_asm!(\n            \
                 \".pushsection .text.{symbol}, \\\"ax\\\"\",\n            \
                 include_str!({path:?}),\n            \".popsection\",\n            \
                 options(raw),\n        );",
                symbol = entry_name::symbol_of(&entry.stem)
            ),
        }
        .unwrap();
    }
    out.push_str(
        "        }\n        /// The address of every entry, by code.\n        \
         fn entry_addresses() -> [u64; ",
    );
    writeln!(out, "{}] {{\n            unsafe extern \"C\" {{", entries.len()).unwrap();
    for (code, entry) in entries.iter().enumerate() {
        writeln!(
            out,
            "                #[link_name = {:?}]\n                static ENTRY_{code}: u8;",
            entry_name::symbol_of(&entry.stem)
        )
        .unwrap();
    }
    out.push_str("            }\n            [");
    for code in 0..entries.len() {
        write!(out, "core::ptr::addr_of!(ENTRY_{code}) as u64, ").unwrap();
    }
    out.push_str("]\n        }\n    };\n}\n");
    out
}
