#!/usr/bin/env bash
# The main demo. Until the vhost-user daemon lands, it runs a whole session through the
# engine with the guest and the host simulated in memory, and prints what happened.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release -p vsock-core --example session
