#!/usr/bin/env bash
# Builds the local control plane from the Go module proxy into target/tools/cluster-$K8S:
# kube-apiserver, kube-controller-manager, kube-scheduler, the kubelet and kubectl from
# k8s.io/kubernetes (its staging
# modules pinned to the matching v0.x versions: the module's own go.mod points them at
# ./staging, which only works inside its repository), and etcd. Quick when already built
# (about 7 minutes cold on 2 cores).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
versions=$top/scripts/versions
k8s=${QSD_CSI_K8S_VERSION:-$("$versions" kubernetes)}
etcd=${QSD_CSI_ETCD_VERSION:-$("$versions" etcd)}
out=$top/target/tools/cluster-$k8s
mkdir -p "$out"
want=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl etcd csi-provisioner
  csi-snapshotter snapshot-controller csi-resizer)
# With the argument "e2e" (the kubelet suite), also Kubernetes' own end-to-end suite
# (e2e.test), the agnhost binary its test pods run and the ginkgo runner, from the same
# module; and the node's container runtime, containerd (with its runc shim and ctr).
[[ ${1:-} == e2e ]] && want+=(e2e.test agnhost ginkgo containerd containerd-shim-runc-v2 ctr
  cni/bridge cni/host-local cni/loopback)
missing=0
for b in "${want[@]}"; do [[ -x $out/$b ]] || missing=1; done
[[ -f $out/snapshot-crds/groupsnapshot.storage.k8s.io_volumegroupsnapshots.yaml ]] || missing=1
((missing)) || exit 0

mod=$out/src
mkdir -p "$mod"
gomod=$(go mod download -json "k8s.io/kubernetes@$k8s" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
staging_version=v0.${k8s#v1.}
{
  echo "module qsd-csi.dev/cluster-tools"
  echo
  sed -n 's/^go \(.*\)/go \1/p' "$gomod"
  echo
  echo "require k8s.io/kubernetes $k8s"
  echo
  echo "replace ("
  sed -n 's|^\t\(k8s.io/[a-z0-9-]*\) => ./staging/.*|\t\1 => \1 '"$staging_version"'|p' "$gomod"
  echo ")"
} >"$mod/go.mod"
cat >"$mod/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/test/e2e"
)
GO
cd "$mod"
GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true
# Stamped with their version, as Kubernetes' own build does: the API server and the kubelet
# report it (helm checks the chart's kubeVersion against it).
minor=${k8s#v1.} minor=${minor%%.*}
stamp=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  stamp+=" -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl; do
  [[ -x $out/$cmd ]] || GOFLAGS=-mod=mod go build -ldflags "$stamp" -o "$out/$cmd" "k8s.io/kubernetes/cmd/$cmd"
done
if [[ ${1:-} == e2e ]]; then
  [[ -x $out/e2e.test ]] || GOFLAGS=-mod=mod go test -c -ldflags "$stamp" -o "$out/e2e.test" k8s.io/kubernetes/test/e2e
  [[ -x $out/agnhost ]] || CGO_ENABLED=0 GOFLAGS=-mod=mod go build -o "$out/agnhost" k8s.io/kubernetes/test/images/agnhost
  # The ginkgo runner that runs e2e.test's specs in parallel processes, at the version
  # k8s.io/kubernetes requires.
  [[ -x $out/ginkgo ]] || GOFLAGS=-mod=mod go build -o "$out/ginkgo" github.com/onsi/ginkgo/v2/ginkgo
fi
# etcd's server module also carries replace directives (`go install` refuses it): build it
# from a module of our own that requires it.
if [[ ! -x $out/etcd ]]; then
  mkdir -p "$out/etcd-src"
  cd "$out/etcd-src"
  printf 'module qsd-csi.dev/etcd-tool\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$etcd" >go.mod
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' >tools.go
  GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true
  GOFLAGS=-mod=mod go build -o "$out/etcd" go.etcd.io/etcd/server/v3
fi
# NAME MODULE VERSION DEST FLAGS PKG...: main packages of a module (PKG relative to MODULE),
# built static from a module of our own that requires it into DEST (named as PKG's last
# element), with more go build FLAGS (words without spaces).
from_module() {
  local name=$1 module=$2 version=$3 dest=$4 flags=$5 pkg need=0
  shift 5
  for pkg in "$@"; do [[ -x $dest/${pkg##*/} ]] || need=1; done
  ((need)) || return 0
  mkdir -p "$out/$name-src" "$dest"
  printf 'module qsd-csi.dev/%s-tool\n\ngo 1.26\n\nrequire %s %s\n' "$name" "$module" "$version" \
    >"$out/$name-src/go.mod"
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    for pkg in "$@"; do printf '\t_ "%s/%s"\n' "$module" "$pkg"; done
    printf ')\n'
  } >"$out/$name-src/tools.go"
  (cd "$out/$name-src" && { GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true; }
   for pkg in "$@"; do
     # shellcheck disable=SC2086 # FLAGS are separate words
     CGO_ENABLED=0 GOFLAGS=-mod=mod go build $flags -o "$dest/${pkg##*/}" "$module/$pkg" || exit 1
   done)
}
if [[ ${1:-} == e2e ]]; then
  # containerd (the kubelet wants the CRI's RuntimeConfig, which Debian's containerd 1.6
  # lacks: 1.37 warns, 1.38 drops the fallback), without the btrfs snapshotter (it needs cgo);
  # the runc it runs is the host's.
  ctrd=$("$versions" containerd)
  from_module containerd github.com/containerd/containerd/v2 "$ctrd" "$out" \
    "-tags=no_btrfs -ldflags=-X=github.com/containerd/containerd/v2/version.Version=$ctrd" \
    cmd/containerd cmd/containerd-shim-runc-v2 cmd/ctr
  # The CNI plugins of the node's pod network.
  from_module cni github.com/containernetworking/plugins "$("$versions" cniPlugins)" "$out/cni" "" \
    plugins/main/bridge plugins/ipam/host-local plugins/main/loopback
fi
# The CSI sidecars, the same way: a module of our own requiring the sidecar's, with the
# sidecar's own replace directives (those pointing into its repository left out).
sidecar() { # MODULE VERSION NAME CMD...
  local module=$1 version=$2 dir=$out/$3-src
  shift 3
  local need=0
  for cmd in "$@"; do [[ -x $out/$cmd ]] || need=1; done
  ((need)) || return 0
  mkdir -p "$dir"
  local theirs
  theirs=$(go mod download -json "$module@$version" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
  {
    printf 'module qsd-csi.dev/%s-tool\n\n' "${dir##*/}"
    sed -n 's/^go \(.*\)/go \1/p' "$theirs"
    printf '\nrequire %s %s\n\n' "$module" "$version"
    grep -E '^replace [^ ]+ => [^ .]' "$theirs" || true
    sed -n '/^replace (/,/^)/p' "$theirs" | grep -vE '=> \.' || true
  } >"$dir/go.mod"
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    for cmd in "$@"; do printf '\t_ "%s/cmd/%s"\n' "$module" "$cmd"; done
    printf ')\n'
  } >"$dir/tools.go"
  (cd "$dir" && { GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true; }
   # Static: the same binaries run as host processes and, in images of their own, as the
   # chart's sidecar containers.
   for cmd in "$@"; do CGO_ENABLED=0 GOFLAGS=-mod=mod go build -o "$out/$cmd" "$module/cmd/$cmd"; done)
}
v() { "$versions" "sidecars.$1.$2"; }
sidecar "$(v provisioner module)" "$(v provisioner version)" provisioner csi-provisioner
sidecar "$(v snapshotter module)" "$(v snapshotter version)" snapshotter csi-snapshotter \
  snapshot-controller
sidecar "$(v resizer module)" "$(v resizer version)" resizer csi-resizer
# The snapshot and group snapshot CRDs, from the snapshotter's client module.
if [[ ! -f $out/snapshot-crds/groupsnapshot.storage.k8s.io_volumegroupsnapshots.yaml ]]; then
  crds=$(go mod download -json "github.com/kubernetes-csi/external-snapshotter/client/v8@$("$versions" snapshotClient)" \
    | sed -n 's/.*"Dir": "\(.*\)",/\1/p')/config/crd
  mkdir -p "$out/snapshot-crds" && cp "$crds"/snapshot.storage.k8s.io_*.yaml "$crds"/groupsnapshot.storage.k8s.io_*.yaml "$out/snapshot-crds/"
fi
ls "$out"
