#!/usr/bin/env bash
# Builds LazyFS (github.com/dsrhaslab/lazyfs at a47a5ba, MIT; see LICENSE) from
# this copy, with Debian's toml11 and spdlog instead of fetching them from the
# network (the only change to upstream: the two CMakeLists.txt files).
# The power-cut tests (tests/it/powerloss.rs) run it; .ci/run builds it with
#   bash tests/lazyfs/build.sh target/lazyfs   -> target/lazyfs/lazyfs
# (a script that runs the binary with its library beside it).
# Needs: apt-get install -y cmake g++ libfuse3-dev fuse3 libtoml11-dev libspdlog-dev
# Run: OUT_DIR/lazyfs MOUNT --config-path CONF.toml -o allow_other -o modules=subdir -o subdir=ROOT -f
# Faults: echo lazyfs::clear-cache > FIFO drops every write not yet fsynced
# (a power cut); README.upstream.md documents the config and every fault.
set -euo pipefail
src=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "${1:?usage: build.sh OUT_DIR}" && cd "$1" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$src/libs" "$src/lazyfs" "$work/"
chmod -R u+w "$work"
(cd "$work/libs/libpcache" && mkdir -p build && cd build && cmake .. >/dev/null && cmake --build . -j2 >/dev/null)
(cd "$work/lazyfs" && mkdir -p build && cd build && cmake -DLAZYFS_BUILD_TESTS=OFF .. >/dev/null && cmake --build . -j2 >/dev/null)
cp "$work/libs/libpcache/build/"libpcache.so* "$out/"
cp "$work/lazyfs/build/lazyfs" "$out/lazyfs.bin"
# the binary finds libpcache beside it
printf '#!/bin/sh\nd=$(dirname "$(readlink -f "$0")")\nLD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$d/lazyfs.bin" "$@"\n' > "$out/lazyfs"
chmod +x "$out/lazyfs"
echo "built $out/lazyfs"
