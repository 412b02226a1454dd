//! What an NMI entry file may be called, and the names derived from it. One module shared by
//! the abi's build script (which discovers the files in `entries/`) and by `nmifuzz
//! new-entry`, so that both accept exactly the same names.

/// Longest file stem an entry may have.
pub const MAX_STEM_LEN: usize = 32;

/// Checks an entry file's stem (`entries/<stem>.rs` or `entries/<stem>.S`): a lower-case
/// identifier, `[a-z][a-z0-9_]*`, of at most [`MAX_STEM_LEN`] bytes, since it becomes both a
/// Rust module and part of the entry's assembly symbol.
pub fn check_stem(stem: &str) -> Result<(), String> {
    let mut chars = stem.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !stem.ends_with('_')
        && !stem.contains("__");
    if !valid {
        return Err(format!(
            "`{stem}` is not a valid entry name: use a lower-case identifier like `my_entry` \
             (letters, digits and single underscores, starting with a letter)"
        ));
    }
    if stem.len() > MAX_STEM_LEN {
        return Err(format!("`{stem}` is longer than {MAX_STEM_LEN} characters"));
    }
    if RUST_KEYWORDS.contains(&stem) {
        return Err(format!("`{stem}` is a Rust keyword, which cannot name the entry's module"));
    }
    Ok(())
}

/// The name users type (`--variant NAME`) for the entry in `<stem>.*`: `no_stack_check` is
/// `no-stack-check`.
pub fn name_of(stem: &str) -> String {
    stem.replace('_', "-")
}

/// The stem of the entry users call `name`.
pub fn stem_of(name: &str) -> String {
    name.replace('-', "_")
}

/// The entry's assembly symbol, which the host points IDT vector 2 at: `nmi_<stem>`.
pub fn symbol_of(stem: &str) -> String {
    format!("nmi_{stem}")
}

/// Rust's strict and reserved keywords (the Reference, "Keywords").
const RUST_KEYWORDS: &[&str] = &[
    "as", "break", "const", "continue", "crate", "else", "enum", "extern", "false", "fn", "for",
    "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref", "return",
    "self", "static", "struct", "super", "trait", "true", "type", "unsafe", "use", "where",
    "while", "async", "await", "dyn", "abstract", "become", "box", "do", "final", "macro",
    "override", "priv", "typeof", "unsized", "virtual", "yield", "try", "gen",
];
