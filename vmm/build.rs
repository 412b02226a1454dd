//! Builds the guest kernel (`../guest`) and the agent a real kernel runs as `/init` (`../agent`),
//! both for `x86_64-unknown-none`, and embeds their ELFs, so that one `cargo build` of the host
//! builds everything.
//!
//! Each is its own cargo workspace with its own `.cargo/config.toml` (target, linker script), so
//! it is built by a nested `cargo build` run from its directory, into a target directory under
//! `OUT_DIR` so that it never contends with the host build's lock.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_TARGET: &str = "x86_64-unknown-none";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    ensure_guest_target();
    let guest = build_nested(&manifest_dir.join("../guest"), &out_dir, "guest", "the guest kernel");
    println!("cargo:rustc-env=NMIFUZZ_GUEST_ELF={}", guest.display());
    let agent = build_nested(&manifest_dir.join("../agent"), &out_dir, "agent", "the agent");
    println!("cargo:rustc-env=NMIFUZZ_AGENT_ELF={}", agent.display());
}

/// Builds the binary `bin` of the cargo workspace in `dir` for [`GUEST_TARGET`] and copies it
/// to `OUT_DIR/<bin>.elf`, which it returns.
fn build_nested(dir: &Path, out_dir: &Path, bin: &str, what: &str) -> PathBuf {
    for path in [
        "../entries",
        "src",
        "abi/src",
        "abi/Cargo.toml",
        "Cargo.toml",
        "Cargo.lock",
        "link.ld",
        "build.rs",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", dir.join(path).display());
    }

    let target_dir = out_dir.join(format!("{bin}-target"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(dir)
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir);
    // The host build's flags and wrappers (RUSTFLAGS, clippy's driver, coverage tools, a forced
    // --target) are meant for host code; each nested workspace has its own flags in its
    // .cargo/config.toml.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        build.env_remove(var);
    }
    let status = build.status().unwrap_or_else(|e| fail(&format!("cannot run cargo: {e}")));
    if !status.success() {
        fail(&format!("building {what} in {} failed ({status})", dir.display()));
    }

    let elf = target_dir.join(GUEST_TARGET).join("release").join(bin);
    let embedded = out_dir.join(format!("{bin}.elf"));
    std::fs::copy(&elf, &embedded)
        .unwrap_or_else(|e| fail(&format!("cannot copy {}: {e}", elf.display())));
    embedded
}

/// Makes sure the guest's target is installed, adding it with rustup when it is not.
fn ensure_guest_target() {
    if target_installed() {
        return;
    }
    println!("cargo:warning=installing the guest target with `rustup target add {GUEST_TARGET}`");
    match Command::new("rustup").args(["target", "add", GUEST_TARGET]).status() {
        Ok(status) if status.success() && target_installed() => {}
        Ok(status) => fail(&format!(
            "`rustup target add {GUEST_TARGET}` failed ({status}). The guest kernel needs the \
             {GUEST_TARGET} standard library: install it with rustup, or use a toolchain that ships it"
        )),
        Err(e) => fail(&format!(
            "the {GUEST_TARGET} target is not installed and rustup cannot be run ({e}). \
             Install rustup (https://rustup.rs) and run `rustup target add {GUEST_TARGET}`"
        )),
    }
}

fn target_installed() -> bool {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Path::new(&sysroot).join("lib/rustlib").join(GUEST_TARGET).join("lib").is_dir()
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    panic!("{message}");
}
