//! Builds baton's emulated verbs provider (a test and benchmark aid, never loaded unless asked
//! for) as a shared library, and exposes its path as `BATON_VERBS_EMU_PATH`. It compiles against
//! the system's `<infiniband/verbs.h>`; without the header the path is left unset and the RDMA
//! tests fail, saying so.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "emu/verbs_emu.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CC");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ext = if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("macos") { "dylib" } else { "so" };
    let lib = out.join(format!("libbaton_verbs_emu.{ext}"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-fvisibility=hidden", "-o"])
        .arg(&lib)
        .arg(src)
        .arg("-lpthread")
        .status();
    match status {
        Ok(s) if s.success() => println!("cargo:rustc-env=BATON_VERBS_EMU_PATH={}", lib.display()),
        other => println!(
            "cargo:warning=emulated verbs provider not built ({other:?}); install libibverbs-dev \
             (or the macOS SDK with <infiniband/verbs.h>) for the RDMA tests"
        ),
    }
}
