#!/usr/bin/env bash
# Runs the whole test suite, the real-guest tests included: it builds the guest image (and
# installs QEMU and the guest's parts with apt-get if they are missing), installs tshark for
# the trace checks, builds the release daemon the real-guest tests boot against, the
# guest's seqpacket helper and the kernel's vsock_test, and makes a missing part a failure rather than a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/guest/build.sh
# tshark checks every trace the tests write.
if ! command -v tshark >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends tshark \
        || { $sudo apt-get update -q; $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends tshark; }
fi
cargo build --release -p vsock-vhost-user --bin vhost-user-vsock
# The kernel's own vsock_test, built statically from Debian's linux-source-6.1 (downloaded,
# never installed or committed), for the two-guest run (tests/tests/vsock_test.rs).
./scripts/vsock-test/build.sh
# The guest's seqpacket helper, static so the initramfs needs nothing more.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release \
    --manifest-path tests/guest-seq/Cargo.toml --target-dir target/guest-seq
export VSOCK_REQUIRE_GUEST=1
cargo test --workspace --all-targets
cargo test --workspace --doc
