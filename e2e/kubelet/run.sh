#!/usr/bin/env bash
# A real node: kubelet, containerd, runc and the CNI bridge run real pods that use qsd-csi
# volumes. The control plane is e2e/cluster's (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, snapshot-controller, the CSI sidecars, built from the Go module proxy), all on
# 127.0.0.1; pods get addresses on a bridge of this run's own (10.88.0.0/24, no masquerade, no
# route anywhere else). The pods' images are built here (images.sh).
#
# qsd-csi runs as host processes (`qsd-csi node`, `qsd-csi-registrar` and `qsd-csi controller`),
# not yet as the chart's pods: what the kubelet does with them is real. It registers the driver
# through the registrar's socket, stages and publishes volumes for pods, and unpublishes and
# unstages them when the pods go.
# Ends with the plain line "kubelet: N passed, N failed".
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
versions=$top/scripts/versions
k8s=$("$versions" kubernetes)
tools=$top/target/tools/cluster-$k8s
helm=$top/target/tools/helm-$("$versions" helm)/helm
summary() { echo "kubelet: $1 passed, $2 failed"; }

"$top/e2e/cluster/build-tools.sh" >/dev/null || { echo "kubelet: building the cluster tools failed" >&2; summary 0 1; exit 1; }
[[ -x $helm ]] || "$top/e2e/chart/run.sh" >/dev/null 2>&1 || true # builds helm
mapfile -t images < <("$here/images.sh") || { summary 0 1; exit 1; }
(cd "$top" && cargo build --quiet -p qsd-csi-controller --bin qsd-csi) || { summary 0 1; exit 1; }
registrar=$("$top/scripts/build-registrar") || { summary 0 1; exit 1; }
qsd_csi=$top/target/debug/qsd-csi

suite=kubelet failed_line="kubelet: 0 passed, 1 failed"
# This run's bridge. (The containers' shims name the run's directory in their command lines,
# so the shared cleanup kills them with everything else.)
cleanup_more() { ip link delete qsdk0 2>/dev/null; }
# shellcheck source=../lib/cluster.sh
. "$top/e2e/lib/cluster.sh"
agent_port=$(port) kubelet_port=$(port)

# --- control plane -----------------------------------------------------------------------------
start_control_plane persistentvolume-binder-controller,persistentvolume-expander-controller,persistentvolumeclaim-protection-controller,persistentvolume-protection-controller,serviceaccount-controller,node-lifecycle-controller
start kube-scheduler "$tools/kube-scheduler" --kubeconfig "$KUBECONFIG" --leader-elect=false --secure-port=0

# --- the node: containerd, CNI, kubelet ------------------------------------------------------------
# The kubelet's directory is a mount of its own, shared, so mounts under it propagate.
mkdir -p "$work/kubelet" "$work/cni" "$work/containerd"
mount --bind "$work/kubelet" "$work/kubelet" && mount --make-rshared "$work/kubelet"
cat >"$work/containerd.toml" <<TOML
version = 2
root = "$work/containerd/root"
state = "$work/containerd/state"
[grpc]
  address = "$work/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:$("$versions" images.pause)"
  # This machine withholds CAP_SYS_RESOURCE: no negative oom_score_adj for containers.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$work/cni"
TOML
# A bridge of this run's own; pods reach nothing but this host's bridge address.
cat >"$work/cni/10-qsd.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "qsd-kubelet", "plugins": [
  {"type": "bridge", "bridge": "qsdk0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/24"}]], "routes": []}},
  {"type": "loopback"}]}
JSON
start containerd containerd --config "$work/containerd.toml"
wait_until 30 test -S "$work/containerd.sock" || fail_start containerd containerd
for image in "${images[@]}"; do
  ctr --address "$work/containerd.sock" -n k8s.io images import "$image" >/dev/null \
    || fail_start "importing $image" containerd
done
cat >"$work/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 on this machine: kubelet >= 1.35 refuses it unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$work/containerd.sock
authentication: {anonymous: {enabled: false}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
address: 127.0.0.1
port: $kubelet_port
readOnlyPort: 0
healthzPort: 0
failSwapOn: false
resolvConf: ""
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
YAML
kubelet() {
  start kubelet "$tools/kubelet" --kubeconfig "$KUBECONFIG" --config "$work/kubelet.yaml" \
    --root-dir "$work/kubelet" --hostname-override w1 --node-ip 127.0.0.1
  echo $! >"$work/kubelet.pid"
}
kubelet
wait_until 90 bash -c "[[ \$('$tools/kubectl' get node w1 -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}') == True ]]" \
  || fail_start "the kubelet (node Ready)" kubelet

# --- qsd-csi: the chart's cluster objects, the node plugin and the controller ----------------------
kubectl create namespace qsd >/dev/null
{ render_chart && apply_chart_objects; } || { summary 0 1; exit 1; }
kubectl create serviceaccount default >/dev/null 2>&1 # (pods' admission; the controller may be slow)
"$qsd_csi" certs sign-node --node w1 --ca-cert "$work/tls/ca.crt" --ca-key "$work/tls/ca.key" \
  --out-dir "$work/tls" >/dev/null || { summary 0 1; exit 1; }
plugin=$work/kubelet/plugins/qsd.csi.dev
start node "$qsd_csi" --endpoint "unix://$plugin/csi.sock" node --state-dir "$work/state" --node w1 \
  --device fuse --agent-listen "127.0.0.1:$agent_port" --tls-cert "$work/tls/w1.crt" \
  --tls-key "$work/tls/w1.key" --tls-ca "$work/tls/ca.crt"
wait_until 60 test -S "$plugin/csi.sock" || fail_start "the node plugin" node
start registrar "$registrar" --csi-address "$plugin/csi.sock" --kubelet-registration-path "$plugin/csi.sock" \
  --registration-dir "$work/kubelet/plugins_registry"
start controller "$qsd_csi" --endpoint "unix://$work/ctl.sock" controller \
  --agent "w1=127.0.0.1:$agent_port" --tls-cert "$work/tls/tls.crt" --tls-key "$work/tls/tls.key" \
  --tls-ca "$work/tls/ca.crt"
wait_until 60 test -S "$work/ctl.sock" || fail_start "the controller" controller
start_sidecars "$KUBECONFIG" "$work/ctl.sock"

# --- the tests ---------------------------------------------------------------------------------------
busybox="registry.k8s.io/e2e-test-images/busybox:$("$versions" images.busybox)"
pvc() { # NAME [SIZE] [MODE] [DATA SOURCE YAML]
  kubectl apply -f - <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1}
spec:
  storageClassName: qsd-local
  accessModes: [ReadWriteOnce]
  volumeMode: ${3:-Filesystem}
  resources: {requests: {storage: ${2:-64Mi}}}
  ${4:-}
YAML
}
# A pod that runs SCRIPT with claim CLAIM at /data (or, for a block claim, as /dev/qsd).
pod() { # NAME CLAIM SCRIPT [block]
  local mount="volumeMounts: [{name: v, mountPath: /data}]"
  [[ ${4:-} == block ]] && mount="volumeDevices: [{name: v, devicePath: /dev/qsd}]"
  kubectl apply -f - <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  dnsPolicy: Default
  containers:
    - name: c
      image: $busybox
      command: ["/bin/sh", "-c", $(printf '%s' "$3" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')]
      $mount
  volumes: [{name: v, persistentVolumeClaim: {claimName: $2}}]
YAML
}
succeeded() { kubectl wait --for=jsonpath='{.status.phase}'=Succeeded "pod/$1" --timeout=120s || { kubectl describe pod "$1" | tail -15; return 1; }; }
running() { kubectl wait --for=condition=Ready "pod/$1" --timeout=120s || { kubectl describe pod "$1" | tail -15; return 1; }; }
gone() { kubectl delete pod "$@" --wait --timeout=60s >/dev/null; }

registered() {
  # The kubelet found qsd-csi-registrar's socket and asked it, then asked the node plugin:
  # CSINode lists the driver with its topology key, and the node carries its topology label.
  wait_until 60 bash -c "[[ \$('$tools/kubectl' get csinode w1 -o jsonpath='{.spec.drivers[0].name}') == qsd.csi.dev ]]" || return 1
  [[ $(kubectl get csinode w1 -o jsonpath='{.spec.drivers[0].nodeID} {.spec.drivers[0].topologyKeys[0]}') == "w1 topology.qsd.csi.dev/node" ]] || return 1
  [[ $(kubectl get node w1 -o jsonpath='{.metadata.labels.topology\.qsd\.csi\.dev/node}') == w1 ]] || return 1
  grep -q "the kubelet registered the driver" "$work/registrar.log"
}
check "the kubelet registers the driver through qsd-csi-registrar" registered

persist() {
  pvc data && pod writer data 'echo written-by-a-pod >/data/f && sync && test -s /data/f' || return 1
  succeeded writer && gone writer || return 1
  pod reader data 'grep -qx written-by-a-pod /data/f' && succeeded reader && gone reader
}
check "a pod writes and syncs a file; the pod deleted, a new pod reads the same bytes" persist

block() {
  pvc raw 32Mi Block || return 1
  pod blockpod raw 'printf qsd-block-bytes | dd of=/dev/qsd bs=512 seek=100 conv=fsync 2>/dev/null && dd if=/dev/qsd bs=512 skip=100 count=1 2>/dev/null | grep -q qsd-block-bytes' block || return 1
  succeeded blockpod && gone blockpod
}
check "a raw block claim (volumeMode: Block) used by a pod: bytes written and read back" block

restore() {
  kubectl apply -f - <<YAML || return 1
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: snap}
spec: {volumeSnapshotClassName: qsd-snapshots, source: {persistentVolumeClaimName: data}}
YAML
  kubectl wait --for=jsonpath='{.status.readyToUse}'=true volumesnapshot/snap --timeout=90s || return 1
  pod later data 'echo later >/data/later && sync' && succeeded later && gone later || return 1
  pvc restored 64Mi Filesystem "dataSource: {name: snap, kind: VolumeSnapshot, apiGroup: snapshot.storage.k8s.io}" || return 1
  pod checker restored 'grep -qx written-by-a-pod /data/f && test ! -e /data/later' && succeeded checker && gone checker
}
check "VolumeSnapshot, then a claim restored from it: a pod reads the earlier data, not the later" restore

clone() {
  pvc cloned 64Mi Filesystem "dataSource: {name: data, kind: PersistentVolumeClaim}" || return 1
  pod clonecheck cloned 'grep -qx written-by-a-pod /data/f && test -e /data/later' && succeeded clonecheck && gone clonecheck
}
check "a clone claim (dataSource: PVC) holds the source's data" clone

restart() {
  # A pod keeps writing while the kubelet is killed and started again.
  pod keeper data 'i=0; while true; do i=$((i+1)); echo $i >/data/beat; sync; sleep 0.2; done' && running keeper || return 1
  local mnt; mnt=$(findmnt -rn -o TARGET | grep "$work/kubelet/pods/.*/volumes/kubernetes.io~csi/.*/mount$" | head -1)
  [[ -n $mnt ]] || { echo "no published mount"; return 1; }
  kill -9 "$(cat "$work/kubelet.pid")"; kubelet
  wait_until 60 bash -c "[[ \$('$tools/kubectl' get node w1 -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}') == True ]]" || return 1
  local before; before=$(cat "$mnt/beat")
  wait_until 30 bash -c "(( \$(cat '$mnt/beat') > $before + 5 ))" || { echo "the pod stopped writing"; return 1; }
  findmnt "$mnt" >/dev/null && gone keeper
}
check "the kubelet restarted while a pod writes: the volume stays mounted and writable" restart

cleanup_all() {
  kubectl delete volumesnapshot snap --wait --timeout=90s >/dev/null || return 1
  kubectl delete pvc data raw restored cloned --wait --timeout=90s >/dev/null || return 1
  wait_until 90 bash -c "[[ -z \$('$tools/kubectl' get pv -o name) ]]" || { kubectl get pv; return 1; }
  local left; left=$(findmnt -rn -o TARGET | grep "^$work/kubelet/" | grep -v "^$work/kubelet$")
  [[ -z $left ]] || { echo "mounts left: $left"; return 1; }
  [[ -z $(ls "$work/state/pools/default/layers") ]] || { ls "$work/state/pools/default/layers"; return 1; }
  [[ -z $(losetup -a | grep "$work") ]]
}
check "pods and claims deleted: no volume, layer, mount or device left" cleanup_all

if ((failed)); then
  for l in kubelet node controller csi-provisioner containerd; do
    echo "--- $l (last lines)"; tail -8 "$work/$l.log"
  done
fi
summary "$passed" "$failed"
((failed == 0))
