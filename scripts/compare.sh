#!/usr/bin/env bash
# Runs the demo's session (64 MiB each way between a real Debian guest and host Unix sockets,
# and a connect to a port nobody listens on) against our daemon and against rust-vmm's
# vhost-device-vsock 0.3.0 (built from crates.io into target/reference), alternating, and
# prints what each run measured. Same machine, same guest, same moment.
# usage: scripts/compare.sh [ROUNDS]      (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
./scripts/guest/build.sh >&2
cargo build --release -p vsock-vhost-user -p vsock-tests --bin vhost-user-vsock --bin vsock-demo >&2
reference=target/reference/bin/vhost-device-vsock
[ -x "$reference" ] || cargo install vhost-device-vsock --version 0.3.0 --root target/reference >&2
for round in $(seq "$rounds"); do
    for who in vhost-user-vsock vhost-device-vsock; do
        if [ "$who" = vhost-user-vsock ]; then
            out=$(./target/release/vsock-demo mio)
        else
            out=$(./target/release/vsock-demo --other "$reference")
        fi
        echo "$out" | grep -E '^(guest -> host|host -> guest|guest connect)' | sed "s/^/$who #$round: /"
    done
done
