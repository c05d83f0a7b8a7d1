#!/usr/bin/env bash
# Runs csi-sanity (kubernetes-csi/csi-test, pinned, from the Go module proxy) against the
# standalone `qsd-csi` endpoint: once with mount volumes, once with raw block volumes.
# Ends with the plain line "csi-sanity: N passed, N failed, N skipped".
# Skips and their reasons: README.md beside this file.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
version=$("$top/scripts/versions" csiSanity)
bin_dir=${QSD_CSI_TOOLS:-$top/target/tools}
sanity=$bin_dir/csi-sanity-$version

if [[ ! -x $sanity ]]; then
  echo "csi-sanity: building $version from the Go module proxy"
  mkdir -p "$bin_dir"
  GOBIN=$bin_dir go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$version"
  mv "$bin_dir/csi-sanity" "$sanity"
fi
cargo build --quiet -p qsd-csi --bin qsd-csi
qsd_csi=$top/target/debug/qsd-csi

passed=0 failed=0 skipped=0 status=0
for access in mount block; do
  work=$(mktemp -d /tmp/qsd-csi-sanity.XXXXXX)
  "$qsd_csi" standalone --endpoint "unix://$work/csi.sock" --state-dir "$work/state" --node sanity-node \
    >"$work/driver.log" 2>&1 &
  driver=$!
  # Wait for the socket the driver creates once it serves (or for the driver to exit).
  while [[ ! -S $work/csi.sock ]] && kill -0 "$driver" 2>/dev/null; do sleep 0.1; done
  set +e
  "$sanity" --csi.endpoint "$work/csi.sock" \
    --csi.stagingdir "$work/staging" --csi.mountdir "$work/mount" \
    --csi.testvolumesize 67108864 --csi.testvolumeexpandsize 134217728 \
    --csi.testvolumeaccesstype "$access" \
    --csi.testvolumemutableparameters "$here/mutable-parameters.yaml" \
    --ginkgo.skip 'creating a snapshot with accessibility requirements' \
    --ginkgo.no-color --ginkgo.timeout 20m >"$work/sanity.out" 2>&1
  rc=$?
  set -e
  kill "$driver" 2>/dev/null || true
  wait "$driver" 2>/dev/null || true
  pid=$(cat "$work/state/run/qsd.pid" 2>/dev/null || true)
  if [[ -n $pid ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
  line=$(grep -E '^(SUCCESS|FAIL)! -- ' "$work/sanity.out" | tail -1 || true)
  echo "csi-sanity ($access): ${line:-no result (exit $rc)}"
  if [[ $rc -ne 0 || -z $line ]]; then
    status=1
    grep -A12 -E '^\s*\[(FAILED|PANICKED)\] [^i]' "$work/sanity.out" | head -80 || true
    tail -20 "$work/driver.log"
  fi
  p=$(sed -nE 's/.* ([0-9]+) Passed.*/\1/p' <<<"$line"); f=$(sed -nE 's/.* ([0-9]+) Failed.*/\1/p' <<<"$line")
  s=$(sed -nE 's/.* ([0-9]+) Skipped.*/\1/p' <<<"$line")
  passed=$((passed + ${p:-0})) failed=$((failed + ${f:-0})) skipped=$((skipped + ${s:-0}))
  [[ -z $line ]] && failed=$((failed + 1))
  umount -R "$work/mount" "$work/staging" 2>/dev/null || true
  rm -rf "$work" 2>/dev/null || true
done
echo "csi-sanity: $passed passed, $failed failed, $skipped skipped"
exit $status
