#!/usr/bin/env bash
# The engine tests and csi-sanity again, against the newest QEMU Debian ships (trixie-backports,
# the one the image carries; scripts/qemu-newest makes and caches it), while every other suite
# runs the host's QEMU, the oldest supported. The daemon the node plugin starts is whichever
# `qemu-storage-daemon` comes first on PATH, so this puts the newest first.
# The inner output is indented (so scripts/test counts it once, here); ends with the summary
# line "qemu-newest: N passed, N failed, N skipped".
set -uo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
cd "$top" || exit 1
if ! bin=$(scripts/qemu-newest); then
  echo "qemu-newest: could not make the newest QEMU's root"
  echo "qemu-newest: 0 passed, 1 failed, 0 skipped"
  exit 1
fi
export PATH="$bin:$PATH"
echo "qemu-newest: $(qemu-storage-daemon --version | sed -n 1p)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The engine (node plugin) and the driver's end-to-end tests; then csi-sanity.
# The storm's 20 runs in a row are the oldest QEMU's (in scripts/test); five here.
QSD_CSI_STORM_RUNS=${QSD_CSI_STORM_RUNS:-5} cargo test --no-fail-fast -p qsd-csi-node -p qsd-csi 2>&1 | tee "$log" | sed 's/^/  /'
cargo_status=${PIPESTATUS[0]}
e2e/csi-sanity/run.sh 2>&1 | tee -a "$log" | sed 's/^/  /'
sanity_status=${PIPESTATUS[0]}
# The two parts' summary lines, summed into this suite's.
{ scripts/count-tests libtest cargo "$cargo_status" <"$log"; grep -E '^csi-sanity: [0-9]+ passed' "$log"; } |
  awk -v sanity="$sanity_status" '
    { p += $2; f += $4; s += $6 }
    END {
      if (sanity != 0 && f == 0) f = 1
      printf "qemu-newest: %d passed, %d failed, %d skipped\n", p, f, s
    }'
[[ $cargo_status -eq 0 && $sanity_status -eq 0 ]]
