//! Decides whether the real-guest tests can run here, so that a machine without their parts
//! reports them as ignored (with the reason) instead of passing them with nothing run.
//!
//! It looks for what `vsock_tests::guest::Image::find` needs besides the daemon: the guest
//! image (`vmlinuz` and `initramfs.cpio.gz` in `$VSOCK_GUEST_DIR`, or `target/guest`) and
//! `qemu-system-x86_64` on `PATH`. With both it sets `cfg(vsock_guest)`, and the tests run.
//! With `VSOCK_REQUIRE_GUEST=1` (set by `scripts/test.sh`, which CI runs) it sets the cfg
//! regardless: the tests run and a missing part fails them, saying which. The daemon is not
//! looked for here: cargo builds it, and a test that finds it missing fails with the command
//! that builds it.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(vsock_guest)");
    for var in [
        "VSOCK_GUEST_DIR",
        "CARGO_TARGET_DIR",
        "VSOCK_REQUIRE_GUEST",
        "PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");

    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target"));
    let dir = env::var_os("VSOCK_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target.join("guest"));
    // A path that does not exist makes cargo run this script again on every build, so the
    // cfg follows the image as it appears or goes.
    let mut image = true;
    for file in ["vmlinuz", "initramfs.cpio.gz"] {
        let path = dir.join(file);
        println!("cargo:rerun-if-changed={}", path.display());
        image &= path.is_file();
    }
    let qemu = find_qemu();

    let require = env::var_os("VSOCK_REQUIRE_GUEST").is_some_and(|v| v == "1");
    if (image && qemu) || require {
        println!("cargo:rustc-cfg=vsock_guest");
    }
    if !(image && qemu) {
        let mut missing = Vec::new();
        if !image {
            missing.push(format!("no guest image in {}", dir.display()));
        }
        if !qemu {
            missing.push("no qemu-system-x86_64 on PATH".to_string());
        }
        let what = missing.join(", ");
        if require {
            println!(
                "cargo:warning=VSOCK_REQUIRE_GUEST=1 but {what}: the real-guest tests will fail"
            );
        }
    }
}

/// Whether `qemu-system-x86_64` is an executable file in a `PATH` directory. Where it is
/// not found, every place it was looked for is watched, so that installing it is noticed.
fn find_qemu() -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = env::var_os("PATH").unwrap_or_default();
    let mut looked = Vec::new();
    for dir in env::split_paths(&path) {
        let candidate = dir.join("qemu-system-x86_64");
        let executable = candidate
            .metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if executable {
            println!("cargo:rerun-if-changed={}", candidate.display());
            return true;
        }
        looked.push(candidate);
    }
    for candidate in looked.iter().filter(|c| c.is_absolute()) {
        println!("cargo:rerun-if-changed={}", candidate.display());
    }
    false
}
