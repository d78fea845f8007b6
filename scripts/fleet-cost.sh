#!/usr/bin/env bash
# What each idle VM costs one daemon: threads, descriptors and resident memory of one
# vhost-user-vsock process serving 1, 16 and 64 VMs with no frontend attached.
# Usage: scripts/fleet-cost.sh [runtime] (mio, tokio or smol; mio when not given).
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=${1:-mio}
cargo build -q --release -p vsock-vhost-user --bin vhost-user-vsock
bin=target/release/vhost-user-vsock
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
printf '%-5s %-8s %-8s %-10s %-10s\n' VMs threads fds "RSS KiB" "per VM KiB"
base_rss=
for n in 1 16 64; do
    args=()
    for i in $(seq 1 "$n"); do
        cid=$((i + 2))
        args+=(--vm "guest-cid=$cid,socket=$dir/v$cid.sock,uds-path=$dir/vm$cid")
    done
    RUST_LOG=warn "$bin" --runtime "$runtime" "${args[@]}" 2>/dev/null &
    pid=$!
    for _ in $(seq 1 500); do
        [ -S "$dir/vm$((n + 2))" ] && break
        sleep 0.02
    done
    sleep 0.5
    threads=$(awk '/^Threads:/ {print $2}' /proc/$pid/status)
    rss=$(awk '/^VmRSS:/ {print $2}' /proc/$pid/status)
    fds=$(ls /proc/$pid/fd | wc -l)
    if [ -z "$base_rss" ]; then base_rss=$rss; per="-"; else per=$(( (rss - base_rss) / (n - 1) )); fi
    printf '%-5s %-8s %-8s %-10s %-10s\n' "$n" "$threads" "$fds" "$rss" "$per"
    kill -TERM $pid
    wait $pid 2>/dev/null || true
    rm -f "$dir"/*
done
