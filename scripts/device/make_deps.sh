#!/usr/bin/env bash
# Packs the build dependencies the GPU machine lacks (fmt, ICU, nlohmann-json, CLI11, Eigen: headers, shared
# libraries and CMake package files from this Debian machine) into .devdeps/sa-deps.tar.xz, which `carry` takes
# along and scripts/device/build_cuda.sh unpacks. The GPU machine's own pip libtorch provides Torch.
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
P=$tmp/sa-deps
A=/usr/lib/x86_64-linux-gnu
mkdir -p "$P/include" "$P/lib/x86_64-linux-gnu/cmake" "$P/share/cmake" "$P/share/eigen3"
cp -r /usr/include/fmt /usr/include/nlohmann /usr/include/CLI /usr/include/unicode /usr/include/eigen3 "$P/include/"
cp -a $A/libfmt.so* $A/libicuuc.so* $A/libicui18n.so* $A/libicudata.so* "$P/lib/x86_64-linux-gnu/"
cp -r $A/cmake/fmt "$P/lib/x86_64-linux-gnu/cmake/"
cp -r /usr/share/cmake/CLI11 /usr/share/cmake/nlohmann_json "$P/share/cmake/"
cp -r /usr/share/eigen3/cmake "$P/share/eigen3/"
# fmt's package files fall back to /usr when they find themselves at their original place: make sure they don't.
sed -i "s#$A/cmake/fmt#/nonexistent#" "$P"/lib/x86_64-linux-gnu/cmake/fmt/*.cmake
mkdir -p .devdeps
grep -qx '/.devdeps/' .git/info/exclude 2>/dev/null || echo '/.devdeps/' >> .git/info/exclude
tar -C "$tmp" -cJf .devdeps/sa-deps.tar.xz sa-deps
ls -la .devdeps/sa-deps.tar.xz
