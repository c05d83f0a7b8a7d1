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

work=$(mktemp -d /tmp/qsd-kubelet-XXXX)
pids=()
cleanup() {
  local p
  # Every process started (a check's subshell may have started one: its pid is in the file),
  # then anything else still naming this run's directory.
  for p in "${pids[@]}" $(cat "$work/pids" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
  pkill -9 -f -- "$work/" 2>/dev/null
  wait 2>/dev/null
  [[ -f $work/state/run/qsd.pid ]] && kill -9 "$(cat "$work/state/run/qsd.pid")" 2>/dev/null
  # Containers the runtime left (their shims were killed with it).
  pkill -9 -f "containerd-shim.*$work" 2>/dev/null
  for m in $(findmnt -rn -o TARGET | grep "^$work" | sort -r); do umount -l "$m" 2>/dev/null; done
  ip link delete qsdk0 2>/dev/null
  [[ -n ${QSD_CSI_KEEP_CLUSTER:-} ]] || rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start() { # NAME COMMAND... (log in $work/NAME.log)
  local name=$1; shift
  "$@" >"$work/$name.log" 2>&1 &
  pids+=($!)
  echo $! >>"$work/pids"
}
fail_start() { echo "kubelet: $1 did not start; its log:" >&2; tail -20 "$work/$2.log" >&2; summary 0 1; exit 1; }
wait_until() { # SECONDS COMMAND...: polls (0.2 s) until COMMAND succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do ((SECONDS < deadline)) || return 1; sleep 0.2; done
}

# --- control plane -----------------------------------------------------------------------------
etcd_port=$(port) peer_port=$(port) api_port=$(port) agent_port=$(port) kubelet_port=$(port)
start etcd "$tools/etcd" --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
  --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" --initial-cluster "default=http://127.0.0.1:$peer_port"
openssl genrsa -out "$work/sa.key" 2048 2>/dev/null
token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$token,admin,admin,system:masters" >"$work/tokens.csv"
start kube-apiserver "$tools/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 --secure-port "$api_port" --cert-dir "$work/apiserver" \
  --token-auth-file "$work/tokens.csv" --authorization-mode RBAC \
  --service-account-key-file "$work/sa.key" --service-account-signing-key-file "$work/sa.key" \
  --service-account-issuer https://kubernetes.default.svc --service-cluster-ip-range 10.96.0.0/24 \
  --allow-privileged
cat >"$work/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "https://127.0.0.1:$api_port", insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: "$token"}}]
contexts: [{name: local, context: {cluster: local, user: admin}}]
current-context: local
KC
export KUBECONFIG=$work/kubeconfig
kubectl() { "$tools/kubectl" "$@"; }
wait_until 120 kubectl get --raw /readyz || fail_start kube-apiserver kube-apiserver
start kube-controller-manager "$tools/kube-controller-manager" --kubeconfig "$KUBECONFIG" \
  --leader-elect=false --secure-port=0 \
  --controllers=persistentvolume-binder-controller,persistentvolume-expander-controller,persistentvolumeclaim-protection-controller,persistentvolume-protection-controller,serviceaccount-controller,node-lifecycle-controller
start kube-scheduler "$tools/kube-scheduler" --kubeconfig "$KUBECONFIG" --leader-elect=false --secure-port=0
kubectl apply -f "$tools/snapshot-crds" >/dev/null
wait_until 60 kubectl get volumesnapshotclasses || fail_start "the snapshot CRDs" kube-apiserver
start snapshot-controller "$tools/snapshot-controller" --kubeconfig "$KUBECONFIG" --leader-election=false

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
"$helm" template qsd "$top/charts/qsd-csi" --namespace qsd --kube-version "${k8s#v}" >"$work/chart.yaml"
/usr/bin/python3 - "$work" <<'PY'
import base64, os, sys, yaml
work = sys.argv[1]
docs = [d for d in yaml.safe_load_all(open(f"{work}/chart.yaml")) if d]
keep = [d for d in docs if d["kind"] in ("CSIDriver", "StorageClass", "VolumeSnapshotClass")]
yaml.safe_dump_all(keep, open(f"{work}/cluster-objects.yaml", "w"))
os.makedirs(f"{work}/tls")
for k, v in next(d for d in docs if d["kind"] == "Secret")["data"].items():
    open(f"{work}/tls/{k}", "wb").write(base64.b64decode(v))
PY
kubectl apply -f "$work/cluster-objects.yaml" >/dev/null || { summary 0 1; exit 1; }
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
for s in provisioner:"--feature-gates=Topology=true --extra-create-metadata" snapshotter:"--extra-create-metadata" resizer:""; do
  name=${s%%:*} extra=${s#*:}
  # shellcheck disable=SC2086
  start "csi-$name" "$tools/csi-$name" --kubeconfig "$KUBECONFIG" --csi-address "$work/ctl.sock" \
    --leader-election=false $extra
done

# --- the tests ---------------------------------------------------------------------------------------
passed=0 failed=0
check() { # NAME COMMAND...
  local name=$1; shift
  if out=$("$@" 2>&1); then passed=$((passed + 1)); echo "kubelet: ok $name"
  else failed=$((failed + 1)); echo "kubelet: FAIL $name"; echo "$out" | tail -15 | sed 's/^/  /'; fi
}
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
