#!/usr/bin/env bash
# Builds every image the kubelet suite's pods run, from this machine's own files, as OCI
# archives in target/tools/images (kept; quick when present), under the names the chart and
# Kubernetes' e2e suite use:
#   - qsd-csi, from the Dockerfile (scripts/build-image, QSD_CSI_IMAGE_PROFILE);
#   - the CSI sidecars (provisioner, snapshotter, resizer), each its static binary as built
#     from the Go module proxy by e2e/cluster/build-tools.sh;
#   - pause, from the pause.c that k8s.io/kubernetes ships (gcc -static);
#   - busybox, from Debian's busybox-static;
#   - agnhost, its binary from k8s.io/kubernetes with busybox's shell and tools beside it.
# No registry and no Docker: buildah (vfs storage, its own root under target/) commits them
# from scratch. Prints each archive's path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
versions=$top/scripts/versions
k8s=$("$versions" kubernetes)
tools=$top/target/tools/cluster-$k8s
out=$top/target/tools/images
mkdir -p "$out"
buildah() { command buildah --storage-driver vfs --root "$out/buildah" --runroot "$out/buildah-run" "$@"; }
# NAME FILE-DIR ENTRYPOINT-JSON: an image from scratch holding DIR's files (rebuilt when they
# change).
image() {
  local name=$1 dir=$2 entry=$3 archive key
  key=$( (echo "$entry"; cd "$dir" && find . -type f -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-12)
  archive=$out/${1//[\/:]/_}-$key.tar
  if [[ ! -f $archive ]]; then
    rm -f "$out/${1//[\/:]/_}"-*.tar
    local c; c=$(buildah from scratch)
    buildah copy "$c" "$dir/" / >/dev/null
    buildah config --entrypoint "$entry" --env PATH=/bin "$c"
    buildah commit -q "$c" "$name" >/dev/null
    buildah rm "$c" >/dev/null
    buildah push -q "$name" "oci-archive:$archive.tmp:$name"
    mv "$archive.tmp" "$archive"
    buildah rmi "$name" >/dev/null
  fi
  echo "$archive"
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$top/scripts/build-image"
for s in provisioner snapshotter resizer; do
  mkdir -p "$work/$s/tmp"
  cp "$tools/csi-$s" "$work/$s/"
  image "$("$versions" "sidecars.$s.image"):$("$versions" "sidecars.$s.version")" "$work/$s" "[\"/csi-$s\"]"
done
src=$(go mod download -json "k8s.io/kubernetes@$k8s" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
pause=$("$versions" images.pause)
mkdir -p "$work/pause"
gcc -static -O2 -DVERSION="$pause" -o "$work/pause/pause" "$src/build/pause/linux/pause.c"
image "registry.k8s.io/pause:$pause" "$work/pause" '["/pause"]'
mkdir -p "$work/busybox/bin"
cp /bin/busybox "$work/busybox/bin/"
for applet in $(/bin/busybox --list); do
  [[ $applet == busybox ]] || ln -sf busybox "$work/busybox/bin/$applet"
done
image "registry.k8s.io/e2e-test-images/busybox:$("$versions" images.busybox)" "$work/busybox" '["/bin/sh"]'
cp -a "$work/busybox" "$work/agnhost"
cp "$tools/agnhost" "$work/agnhost/agnhost"
image "registry.k8s.io/e2e-test-images/agnhost:$("$versions" images.agnhost)" "$work/agnhost" '["/agnhost"]'
