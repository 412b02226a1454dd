//! The guest is its own Cargo workspace and cannot inherit the host's `[workspace.lints]`, so
//! guest/Cargo.toml writes them out. This keeps the two lists from drifting apart.

use std::path::Path;

/// The `key = value` lines of the TOML table `[name]` in `text`, in order.
fn table(text: &str, name: &str) -> Vec<String> {
    let header = format!("[{name}]");
    text.lines()
        .skip_while(|line| line.trim() != header)
        .skip(1)
        .take_while(|line| !line.trim_start().starts_with('['))
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_guest_has_the_host_crates_lints() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let host = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let guest = std::fs::read_to_string(root.join("guest/Cargo.toml")).unwrap();
    for group in ["rust", "clippy"] {
        let expected = table(&host, &format!("workspace.lints.{group}"));
        assert!(!expected.is_empty(), "the host workspace has [workspace.lints.{group}]");
        assert_eq!(table(&guest, &format!("lints.{group}")), expected, "[lints.{group}]");
    }
}
