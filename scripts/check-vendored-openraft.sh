#!/usr/bin/env bash
# Check that vendor/openraft is the published openraft crate of the version
# it claims, with exactly vendor/openraft/oclocks.patch applied
# (vendor/openraft/PATCHED.md). Fetches the published crate through cargo
# (the package registry) into a temporary directory; run by .ci/run.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENDOR=$REPO/vendor/openraft
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$VENDOR/Cargo.toml" | head -n 1)
[ -n "$VERSION" ] || { echo "check-vendored-openraft: no version in $VENDOR/Cargo.toml" >&2; exit 1; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# A throwaway package that depends on the published crate, fetched into its
# own CARGO_HOME so that nothing else on the machine is read or changed.
mkdir -p "$TMP/probe/src"
cat > "$TMP/probe/Cargo.toml" <<EOF
[package]
name = "probe"
version = "0.0.0"
edition = "2021"

[dependencies]
openraft = "=$VERSION"
EOF
: > "$TMP/probe/src/lib.rs"
CARGO_HOME=$TMP/cargo-home cargo fetch --quiet --manifest-path "$TMP/probe/Cargo.toml"
PUBLISHED=$(find "$TMP/cargo-home/registry/src" -maxdepth 2 -type d -name "openraft-$VERSION" | head -n 1)
[ -n "$PUBLISHED" ] || { echo "check-vendored-openraft: openraft $VERSION not fetched" >&2; exit 1; }

mkdir "$TMP/expected"
cp -r "$PUBLISHED/src" "$PUBLISHED/Cargo.toml" "$PUBLISHED/README.md" "$TMP/expected/"
(cd "$TMP/expected" && git apply -p1 "$VENDOR/oclocks.patch")
for item in src Cargo.toml README.md; do
  if ! diff -r "$TMP/expected/$item" "$VENDOR/$item" > "$TMP/diff" 2>&1; then
    echo "check-vendored-openraft: vendor/openraft/$item differs from openraft $VERSION + oclocks.patch:" >&2
    head -n 40 "$TMP/diff" >&2
    exit 1
  fi
done
echo "vendor/openraft = openraft $VERSION + oclocks.patch"
