#!/usr/bin/env bash
# Builds the images the kubelet suite's pods run, from this machine's own files, as OCI archives
# in target/tools/images (kept; quick when present): the pause image from the pause.c that
# k8s.io/kubernetes ships (gcc -static), and busybox from Debian's busybox-static. No registry
# and no Docker: buildah (vfs storage, its own root under target/) commits them from scratch.
# Prints each archive's path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
k8s=$("$top/scripts/versions" kubernetes)
out=$top/target/tools/images
mkdir -p "$out"
buildah() { command buildah --storage-driver vfs --root "$out/buildah" --runroot "$out/buildah-run" "$@"; }
# NAME FILE-DIR ENTRYPOINT-JSON: an image from scratch holding DIR's files.
image() {
  local name=$1 dir=$2 entry=$3 archive=$out/${1//[\/:]/_}.tar
  if [[ ! -f $archive ]]; then
    local c; c=$(buildah from scratch)
    buildah copy "$c" "$dir/" / >/dev/null
    buildah config --entrypoint "$entry" --env PATH=/bin "$c"
    buildah commit -q "$c" "$name" >/dev/null
    buildah rm "$c" >/dev/null
    buildah push -q "$name" "oci-archive:$archive.tmp:$name"
    mv "$archive.tmp" "$archive"
  fi
  echo "$archive"
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src=$(go mod download -json "k8s.io/kubernetes@$k8s" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
pause=$("$top/scripts/versions" images.pause)
mkdir -p "$work/pause"
gcc -static -O2 -DVERSION="$pause" -o "$work/pause/pause" "$src/build/pause/linux/pause.c"
image "registry.k8s.io/pause:$pause" "$work/pause" '["/pause"]'
mkdir -p "$work/busybox/bin"
cp /bin/busybox "$work/busybox/bin/"
for applet in $(/bin/busybox --list); do
  [[ $applet == busybox ]] || ln -sf busybox "$work/busybox/bin/$applet"
done
image "registry.k8s.io/e2e-test-images/busybox:$("$top/scripts/versions" images.busybox)" "$work/busybox" '["/bin/sh"]'
