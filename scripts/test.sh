#!/usr/bin/env bash
# Runs the whole test suite, the real-guest tests included: it builds the guest image (and
# installs QEMU and the guest's parts with apt-get if they are missing) and the release
# daemon those tests boot against, and makes a missing part a failure rather than a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/guest/build.sh
cargo build --release -p vsock-vhost-user --bin vhost-user-vsock
export VSOCK_REQUIRE_GUEST=1
cargo test --workspace --all-targets
cargo test --workspace --doc
