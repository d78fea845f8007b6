#!/usr/bin/env bash
# Runs the Linux kernel's own vsock_test between two real guests on one vhost-user-vsock
# daemon (guests 3 and 4 in one sibling group, the control channel over a QEMU network link
# between them), on each runtime, and prints the report of every test case.
#
# usage: scripts/vsock-test/run.sh [mio|tokio|smol]      (default: all three)
#
# Builds what it needs first: the guest image, the release daemon and vsock_test (from
# Debian's linux-source-6.1; see build.sh). The same test runs in CI as part of
# scripts/test.sh; README.md has the last result.
set -euo pipefail
cd "$(dirname "$0")/../.."
./scripts/guest/build.sh
./scripts/vsock-test/build.sh
cargo build --release -p vsock-vhost-user --bin vhost-user-vsock
filter=${1:-}
VSOCK_REQUIRE_GUEST=1 cargo test -p vsock-tests --test vsock_test -- --nocapture --test-threads=1 ${filter:+"$filter::"}
