#!/bin/sh
# Build the first-party plugins and test fixtures as wasm32-wasip2 components and copy them to
# target/plugins/<crate-name>.wasm (e.g. target/plugins/pull-policy.wasm).
# Usage: plugins/build.sh   (from anywhere; needs `rustup target add wasm32-wasip2`)
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
# An explicit --target-dir: a CARGO_TARGET_DIR in the environment (set for the host workspace)
# must not move the artifacts away from where this script copies them from.
cargo build --release --target wasm32-wasip2 --manifest-path "$root/plugins/Cargo.toml" --target-dir "$root/plugins/target"
mkdir -p "$root/target/plugins"
for name in labels pull-policy overwrites pod-spec exec nsenter fixture-fault fixture-fault-strategy; do
    # cargo names the artifact after the crate with '-' turned into '_'.
    artifact=$(echo "$name" | tr - _)
    cp "$root/plugins/target/wasm32-wasip2/release/$artifact.wasm" "$root/target/plugins/$name.wasm.tmp"
    mv "$root/target/plugins/$name.wasm.tmp" "$root/target/plugins/$name.wasm"
done
echo "plugins built into $root/target/plugins"
