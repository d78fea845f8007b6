#!/usr/bin/env bash
# The main demo: builds the vhost-user daemon, boots a Debian guest under QEMU against it,
# moves 64 MiB each way between the guest's AF_VSOCK sockets and host Unix sockets, and prints
# the throughput and the daemon's counters. Installs what it needs (QEMU, the guest kernel).
# usage: scripts/demo.sh [mio|tokio|smol]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/guest/build.sh
cargo build --release -p vsock-vhost-user -p vsock-tests --bin vhost-user-vsock --bin vsock-demo \
    --bin vsock-socket-activate
exec ./target/release/vsock-demo "$@"
