#!/usr/bin/env bash
# Builds the local control plane from the Go module proxy into target/tools/cluster-$K8S:
# kube-apiserver, kube-controller-manager and kubectl from k8s.io/kubernetes (its staging
# modules pinned to the matching v0.x versions: the module's own go.mod points them at
# ./staging, which only works inside its repository), and etcd. Quick when already built.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
k8s=${QSD_CSI_K8S_VERSION:-v1.35.4}
etcd=${QSD_CSI_ETCD_VERSION:-v3.6.5}
out=$top/target/tools/cluster-$k8s
mkdir -p "$out"
want=(kube-apiserver kube-controller-manager kubectl etcd)
missing=0
for b in "${want[@]}"; do [[ -x $out/$b ]] || missing=1; done
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
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
cd "$mod"
GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true
for cmd in kube-apiserver kube-controller-manager kubectl; do
  [[ -x $out/$cmd ]] || GOFLAGS=-mod=mod go build -o "$out/$cmd" "k8s.io/kubernetes/cmd/$cmd"
done
[[ -x $out/etcd ]] || GOBIN=$out go install "go.etcd.io/etcd/server/v3@$etcd"
[[ -x $out/server ]] && mv "$out/server" "$out/etcd"
ls "$out"
