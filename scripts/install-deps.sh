#!/usr/bin/env bash
# Installs the build and test dependencies from Debian 12's archive. Idempotent: apt-get runs only when a package is
# missing. Needs root (or sudo).
set -euo pipefail
packages=(
  build-essential cmake pkg-config
  libtorch-dev libopenblas0-pthread   # libtorch 1.13 CPU; OpenBLAS (pthread) gives it a fast fp32 GEMM
  libdnnl-dev                         # oneDNN headers: our fp32 CPU products call the oneDNN libtorch links
  libopencv-dev libeigen3-dev libfmt-dev nlohmann-json3-dev libcli11-dev libicu-dev
  libgtest-dev libbenchmark-dev
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
