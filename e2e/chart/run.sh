#!/usr/bin/env bash
# The Helm chart: `helm lint --strict`, `helm template` for each TLS source and option set, and
# least privilege (no key in a node pod, see check_privilege.py), and the rendered chart run for real: the DaemonSet's qemu-storage-daemon command, its node plugin
# arguments and the Deployment's controller arguments, with the certificates the chart
# generated, as local processes (paths and addresses moved into a temporary directory). A volume
# is created through the controller, staged and published through the node plugin, written,
# and deleted. Ends with the plain line "chart: N passed, N failed, 0 skipped".
#
# helm comes from the Go module proxy (helm.sh/helm/v3) into target/tools, once.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
version=$("$top/scripts/versions" helm)
helm=$top/target/tools/helm-$version/helm
if [[ ! -x $helm ]]; then
  GOBIN=$(dirname "$helm") GOFLAGS=-mod=mod go install "helm.sh/helm/v3/cmd/helm@$version" || {
    echo "chart: could not build helm $version" >&2; echo "chart: 0 passed, 1 failed, 0 skipped"; exit 1; }
fi
(cd "$top" && cargo build --quiet -p qsd-csi --bin qsd-csi) || exit 1

passed=0 failed=0
check() { # NAME COMMAND...
  local name=$1; shift
  if out=$("$@" 2>&1); then passed=$((passed + 1)); echo "chart: ok $name"
  else failed=$((failed + 1)); echo "chart: FAIL $name"; echo "$out" | tail -25 | sed 's/^/  /'; fi
}
chart=$top/charts/qsd-csi
k8s=--kube-version=1.34.0
check lint "$helm" lint --strict "$chart"
work=$(mktemp -d /tmp/qsd-chart-XXXX)
trap 'rm -rf "$work"' EXIT
# A CA certificate for the cert-manager case's bundle (any will do for rendering).
openssl req -x509 -newkey ed25519 -nodes -subj /CN=issuer -days 1 -keyout "$work/issuer.key" \
  -out "$work/issuer.crt" 2>/dev/null
check template-cert-manager bash -c "'$helm' template t '$chart' $k8s --set tls.source=cert-manager \
  --set volumeAttributesClass.enabled=true --set storageClasses.shared.enabled=true \
  --set-file tls.certManager.caBundle='$work/issuer.crt' >'$work/cert-manager.yaml'"
check least-privilege-cert-manager /usr/bin/python3 "$here/check_privilege.py" "$work/cert-manager.yaml"
check cert-manager-needs-a-ca-bundle bash -c "! '$helm' template t '$chart' $k8s --set tls.source=cert-manager"
check refuses-unknown-tls-source bash -c "! '$helm' template t '$chart' $k8s --set tls.source=x"
# kubernetesAPI: both or neither; when set, every container that talks to the API server gets it.
check api-server-needs-host-and-port bash -c "! '$helm' template t '$chart' $k8s --set kubernetesAPI.host=10.0.0.1"
check api-server-override-reaches-every-api-client bash -c "[[ \$('$helm' template t '$chart' $k8s \
  --set kubernetesAPI.host=10.0.0.1 --set kubernetesAPI.port=6443 | grep -c 'name: KUBERNETES_SERVICE_HOST, value: \"10.0.0.1\"') == 5 ]]"
"$helm" template t "$chart" $k8s >"$work/default.yaml"
check least-privilege /usr/bin/python3 "$here/check_privilege.py" "$work/default.yaml"
# Changed-block tracking's optional pieces: linted, rendered, wired to each other.
check lint-snapshot-metadata "$helm" lint --strict "$chart" --set snapshotMetadata.enabled=true
"$helm" template t "$chart" $k8s --set snapshotMetadata.enabled=true >"$work/snapshot-metadata.yaml"
check snapshot-metadata-wiring /usr/bin/python3 "$here/check_snapshot_metadata.py" "$work/snapshot-metadata.yaml"
check least-privilege-snapshot-metadata /usr/bin/python3 "$here/check_privilege.py" "$work/snapshot-metadata.yaml"
# The sidecar images are the versions the tests build and run (versions.yaml).
pinned() {
  local v image
  for v in provisioner snapshotter resizer; do
    image="$("$top/scripts/versions" "sidecars.$v.image"):$("$top/scripts/versions" "sidecars.$v.version")"
    grep -q "image: $image\$" "$work/default.yaml" || { echo "no $image in the chart"; return 1; }
  done
  [[ $(grep -c 'image: registry.k8s.io' "$work/default.yaml") == 3 ]]
}
check sidecar-images-are-the-tested-versions pinned
# No API server runs for this test (e2e/cluster has one): no leader election.
"$helm" template t "$chart" $k8s --set 'controller.agents[0].name=worker-1' --set controller.leaderElection=false \
  --set storageClasses.shared.enabled=true --set storageClasses.shared.hostPath=/mnt/qsd-shared \
  --set 'controller.agents[0].address=10.0.0.1:9443' >"$work/rendered.yaml"
registrar=$("$top/scripts/build-registrar") || exit 1
check runs-as-rendered /usr/bin/python3 "$here/run_rendered.py" "$work/rendered.yaml" "$work" \
  "$top/target/debug/qsd-csi" "$registrar"
echo "chart: $passed passed, $failed failed, 0 skipped"
[[ $failed -eq 0 ]]
