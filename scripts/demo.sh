#!/usr/bin/env bash
# The README's main command: installs dependencies, builds, runs the sample tool's main job.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/install-deps.sh"
"$root/scripts/build.sh"
# --force: the demo's own folder (out/demo, or --out) is rewritten on every run, so the main command can be repeated;
# the tool alone refuses to overwrite, as everywhere else.
"${BUILD_DIR:-$root/build}/examples/stylealigned" demo --force "$@"
