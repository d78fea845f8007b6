#!/usr/bin/env bash
# Runs the whole test suite. Installs nothing the machine lacks beyond the Rust toolchain,
# which every supported machine has; later suites (real guests) install their own parts.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --all-targets
cargo test --workspace --doc
