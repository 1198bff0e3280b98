#!/usr/bin/env bash
# Builds the example policies (policies/examples/*) and the test policies (policies/tests/*)
# for wasm32-wasip2, which emits WebAssembly components directly, and copies each component to
# target/policies/<name>.wasm, where hubnat's tests and benches look for them.
#
#   scripts/build-policies.sh            # all of them
#   scripts/build-policies.sh --offline  # extra arguments go to every `cargo build`
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

target=wasm32-wasip2
if ! rustup target list --installed | grep -qx "$target"; then
  rustup target add "$target"
fi

out="$root/target/policies"
mkdir -p "$out"
# One target directory for all of them, apart from the host build's.
export CARGO_TARGET_DIR="$root/target/policy-build"

for manifest in policies/examples/*/Cargo.toml policies/tests/*/Cargo.toml; do
  [ -e "$manifest" ] || continue
  dir="$(dirname "$manifest")"
  name="$(basename "$dir")"
  echo "building $dir"
  cargo build --release --locked --target "$target" --manifest-path "$manifest" "$@"
  cp "$CARGO_TARGET_DIR/$target/release/${name//-/_}.wasm" "$out/$name.wasm"
done
ls -l "$out"
