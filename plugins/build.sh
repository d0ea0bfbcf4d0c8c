#!/bin/sh
# Build the first-party plugins and test fixtures as wasm32-wasip2 components and copy them to
# target/plugins/<crate-name>.wasm (e.g. target/plugins/pull-policy.wasm), and the Python
# example plugin(s) with componentize-py.
# The file name is only where docs, tests and the strategy search path find a component:
# the host names a plugin by its metadata (or the config's `name`), never by its file.
# Usage: plugins/build.sh   (from anywhere; needs `rustup target add wasm32-wasip2` and
# `pip install componentize-py`)
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
# An explicit --target-dir: a CARGO_TARGET_DIR in the environment (set for the host workspace)
# must not move the artifacts away from where this script copies them from.
cargo build --release --target wasm32-wasip2 --manifest-path "$root/plugins/Cargo.toml" --target-dir "$root/plugins/target"
mkdir -p "$root/target/plugins"
for name in labels pull-policy overwrites pod-spec exec attach nsenter fixture-fault fixture-fault-strategy; do
    # cargo names the artifact after the crate with '-' turned into '_'.
    artifact=$(echo "$name" | tr - _)
    cp "$root/plugins/target/wasm32-wasip2/release/$artifact.wasm" "$root/target/plugins/$name.wasm.tmp"
    mv "$root/target/plugins/$name.wasm.tmp" "$root/target/plugins/$name.wasm"
done

# Plugins in other languages, against the same WIT (world `policy`). Rebuilt only when the
# source or the WIT changed: componentize-py takes ~20 s (it snapshots an initialised CPython).
if ! command -v componentize-py >/dev/null 2>&1; then
    echo "plugins/build.sh: componentize-py not found; install it with: pip install componentize-py" >&2
    exit 1
fi
for dir in "$root"/plugins/python/*/; do
    name=$(basename "$dir")
    out="$root/target/plugins/$name.wasm"
    if [ -f "$out" ] && [ -z "$(find "$dir" "$root/wit/v0.1.0" -newer "$out" -type f | head -1)" ]; then
        continue
    fi
    (cd "$dir" && componentize-py -d "$root/wit/v0.1.0" -w policy componentize app -o "$out.tmp" >/dev/null)
    mv "$out.tmp" "$out"
done
echo "plugins built into $root/target/plugins"
