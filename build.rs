//! Build steps beside the compiler's own:
//!
//! - Rebuilds when the embedded history migrations change (`sqlx::migrate!` reads them at
//!   compile time).
//! - Links the service's binary with packed relative relocations (`-z pack-relative-relocs`,
//!   glibc's `DT_RELR`) where the glibc it is built against can load them (2.36 or newer).
//!   Why: a position-independent binary of this size carries ~60,000 relative relocations,
//!   1.4 MiB as classic `RELA` entries that the loader reads at every start and that stay
//!   resident; packed, they are ~24 KiB. Measured: 2.5 MiB less resident memory a process
//!   (docs/BENCHMARKS.md, g′). Address-space randomisation is unchanged.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=build.rs");
    if packed_relocations_load() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether a binary built here may use `DT_RELR`: x86-64 Linux with glibc (where the linker
/// Rust uses, its bundled LLD, packs them), built on the machine it is for (a cross build
/// cannot ask the target's glibc), whose glibc is 2.36 or newer. A binary with packed
/// relocations refuses to start on an older glibc, so when in doubt the answer is no.
fn packed_relocations_load() -> bool {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") != "linux"
        || var("CARGO_CFG_TARGET_ENV") != "gnu"
        || var("CARGO_CFG_TARGET_ARCH") != "x86_64"
        || var("HOST") != var("TARGET")
    {
        return false;
    }
    // `glibc 2.36`
    let Ok(out) = std::process::Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
    else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut version = text
        .trim()
        .trim_start_matches("glibc ")
        .split('.')
        .map(|p| p.parse::<u32>().ok());
    matches!(
        (version.next(), version.next()),
        (Some(Some(major)), Some(Some(minor))) if (major, minor) >= (2, 36)
    )
}
