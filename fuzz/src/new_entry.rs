//! `nmifuzz new-entry NAME [--from VARIANT]`: writes a commented starting point for an NMI
//! entry of the user's own into `entries/`, where the build finds it (docs/entries.md).
//!
//! The new file is a copy of an existing entry's file (by default `naive`, the smallest that
//! follows the contract) with its symbols renamed, its header comment replaced by a one-line
//! description to fill in, the template's `Layout:` line, and the contract's rules inline.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nmifuzz_abi::Variant;
use nmifuzz_abi::entry_name::{check_stem, name_of, stem_of, symbol_of};

use crate::options::NewEntryArgs;
use crate::store;

/// The contract in short, as comment lines (without their marker); docs/entries.md has it all.
const CONTRACT: &[&str] = &[
    "The entry contract (docs/entries.md), in short:",
    "  1. The CPU enters at the entry label through the NMI gate, on the NMI stack (IST1), with",
    "     NMIs blocked until the next IRETQ. Its frame (RIP, CS, RFLAGS, RSP, SS of the",
    "     interrupted context) is at IST1 top - 40, and it writes there again for every NMI.",
    "  2. The first instruction is `inc qword ptr [rip + NMI_DELIVERIES]`: it counts deliveries.",
    "  3. Call `do_nmi` once per NMI you let through (or per repeat), with RDI pointing at the",
    "     15 general registers (r15 at the lowest address ... rax) followed directly by the",
    "     interrupted frame, the stack 16-byte aligned and DF clear. Keep them unchanged while",
    "     do_nmi runs: it may take exceptions whose IRETQ unblocks NMIs, so a second NMI can",
    "     arrive anywhere after that.",
    "  4. Leave with IRETQ, exactly to the interrupted context. The host checks every return.",
    "  5. Never execute `out`, `in`, `hlt`, `int3`, `int n` or `vmcall`, and stay in this file's",
    "     section: the build puts the file in .text.nmi_<name>, the NMI-handling code.",
    "  6. Labels `nmi_<name>_<what>:` with `.type <label>, @function` can be named by schedules",
    "     (`{\"at\": {\"symbol\": ...}}`) and appear in traces.",
    "  7. `Layout:` above says where the NMI stack keeps the nesting state: `none`, `linux`, or",
    "     `original=40 temp_rdx=48 executing=56 iret=96 outermost=136` (bytes below IST1 top).",
    "     With a layout you get the final-frame check and the NMI-stack diagram in traces.",
];

/// Writes the new entry and prints where it is and what to run next.
pub fn run(args: &NewEntryArgs) -> Result<()> {
    let stem = stem_of(&args.name);
    check_stem(&stem).map_err(anyhow::Error::msg)?;
    let name = name_of(&stem);
    if let Some(taken) = Variant::from_name(&name) {
        bail!("an entry called `{name}` already exists: {}", taken.file());
    }
    let from = Variant::from_name(&args.from).with_context(|| {
        format!("no entry `{}` to start from; `nmifuzz variants` lists them", args.from)
    })?;
    let root = repository_root(args.root.as_deref())?;
    let template_path = root.join(from.file());
    let template = std::fs::read_to_string(&template_path)
        .with_context(|| format!("{}: cannot read the template", template_path.display()))?;
    let extension = template_path.extension().and_then(|e| e.to_str()).unwrap_or("S");
    let path = root.join("entries").join(format!("{stem}.{extension}"));
    for taken in ["rs", "S"].map(|e| root.join("entries").join(format!("{stem}.{e}"))) {
        if taken.exists() {
            bail!("{} already exists", taken.display());
        }
    }
    let text = scaffold(&template, extension == "rs", from, &stem);
    let written = store::write_new_atomic(&path, text.as_bytes())
        .with_context(|| format!("{}: cannot write", path.display()))?;
    if !written {
        bail!("{} already exists", path.display());
    }
    println!("wrote {}", path.display());
    println!(
        "  a copy of `{}` as `{name}`: describe it in its first line, then edit it.",
        from.name()
    );
    println!("next: build it and fuzz it (`{name}` is then listed by `nmifuzz variants`):");
    println!(
        "  cargo build --release -p nmifuzz && ./target/release/nmifuzz run --variant {name} \
         --max-total-time 60"
    );
    Ok(())
}

/// The template's text with the new header and `from`'s symbols renamed to `stem`'s.
fn scaffold(template: &str, rust: bool, from: Variant, stem: &str) -> String {
    let marker = if rust { "//!" } else { "#" };
    let mut lines = template.lines().peekable();
    let mut layout = None;
    while let Some(line) = lines.next_if(|l| l.trim_start().starts_with(marker)) {
        let comment = line.trim_start()[marker.len()..].trim();
        if comment.starts_with("Layout:") {
            layout = Some(comment.to_owned());
        }
    }
    let mut header = vec![
        format!("`{}`: my NMI entry (describe it in this line).", name_of(stem)),
        String::new(),
        layout.unwrap_or_else(|| "Layout: none".to_owned()),
        String::new(),
        format!("Started from `{}`: {}", from.name(), from.summary()),
        String::new(),
    ];
    header.extend(CONTRACT.iter().map(|l| l.replace("<name>", stem)));
    let mut out: String = header
        .iter()
        .map(|l| if l.is_empty() { format!("{marker}\n") } else { format!("{marker} {l}\n") })
        .collect();
    let body: Vec<&str> = lines.collect();
    out.push_str(&body.join("\n").replace(from.entry_symbol(), &symbol_of(stem)));
    out.push('\n');
    out
}

/// Where `entries/` is: `--root`, else the first directory upward from here that has
/// `entries/` and `guest/abi`, else the tree this binary was built from.
fn repository_root(explicit: Option<&Path>) -> Result<PathBuf> {
    let is_root = |dir: &Path| dir.join("entries").is_dir() && dir.join("guest/abi").is_dir();
    if let Some(root) = explicit {
        if !is_root(root) {
            bail!("{}: not an nmifuzz tree (no entries/ and guest/abi/)", root.display());
        }
        return Ok(root.to_owned());
    }
    let here = std::env::current_dir().context("cannot read the current directory")?;
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    here.ancestors()
        .find(|dir| is_root(dir))
        .map(Path::to_owned)
        .or_else(|| is_root(&built_from).then_some(built_from))
        .context("cannot find the nmifuzz tree (entries/ and guest/abi/): run this inside it or pass --root")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scaffold_renames_symbols_keeps_the_layout_and_states_the_contract() {
        let template = "# Original summary.\n#\n# Layout: linux\n#\n# Old prose.\n\n\
                        nmi_naive:\n    inc qword ptr [rip + NMI_DELIVERIES]\n    jmp nmi_naive_out\n";
        let text = scaffold(template, false, Variant::NAIVE, "my_entry");
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("# `my-entry`: my NMI entry (describe it in this line)."));
        assert!(text.contains("# Layout: linux\n"), "{text}");
        assert!(text.contains("# The entry contract (docs/entries.md)"), "{text}");
        assert!(text.contains("section: the build puts the file in .text.nmi_my_entry"), "{text}");
        assert!(!text.contains("Old prose") && !text.contains("nmi_naive"), "{text}");
        assert!(text.contains("\nnmi_my_entry:\n") && text.contains("jmp nmi_my_entry_out"));
    }
}
