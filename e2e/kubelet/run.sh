#!/usr/bin/env bash
# Real nodes running the real chart: `helm install` of charts/qsd-csi with images built here
# (images.sh), run by real kubelets with containerd and runc (w1, and w2 in namespaces of its
# own: second-node.sh), and pods using its volumes. The
# control plane is e2e/cluster's (etcd, kube-apiserver, kube-controller-manager with every
# default controller, kube-scheduler, snapshot-controller, built from the Go module proxy), all
# on 127.0.0.1; pods get addresses on a bridge of this run's own (10.88.0.0/24, no masquerade,
# no route anywhere else). The chart's pods use the host network and reach the API server at
# 127.0.0.1 (kubernetesAPI): no kube-proxy runs.
#
# Our own checks end with the plain line "kubelet: N passed, N failed, 0 skipped"; Kubernetes' own
# external storage suite (e2e.test, driver in e2e/k8s-e2e) with "k8s-e2e: N passed, N failed,
# N skipped" (QSD_CSI_K8S_E2E=0 leaves it out).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
versions=$top/scripts/versions
k8s=$("$versions" kubernetes)
tools=$top/target/tools/cluster-$k8s
helm=$top/target/tools/helm-$("$versions" helm)/helm
summary() { echo "kubelet: $1 passed, $2 failed, 0 skipped"; }

"$top/e2e/cluster/build-tools.sh" e2e >/dev/null || { echo "kubelet: building the cluster tools failed" >&2; summary 0 1; exit 1; }
[[ -x $helm ]] || "$top/e2e/chart/run.sh" >/dev/null 2>&1 || true # builds helm
# The image's qsd-csi is the debug build every other suite tests (a release build would add
# minutes to CI); QSD_CSI_IMAGE_PROFILE=release for the image users get.
mapfile -t images < <(QSD_CSI_IMAGE_PROFILE=${QSD_CSI_IMAGE_PROFILE:-dev} "$here/images.sh") ||
  { echo "kubelet: building the images failed" >&2; summary 0 1; exit 1; }

suite=kubelet failed_line="kubelet: 0 passed, 1 failed, 0 skipped"
# Two nodes: w2 in namespaces of its own (second-node.sh); QSD_CSI_KUBELET_NODES=1 for w1 alone.
nodes=${QSD_CSI_KUBELET_NODES:-2}
api_host=127.0.0.1
# Two nodes: the API server on w2's link too, and PersistentVolume node affinity mutable (for
# volumes that follow their pods).
if ((nodes == 2)); then api_bind=0.0.0.0 api_host=10.89.0.1 api_gates=MutablePVNodeAffinity=true; fi
# This run's bridge, and w2's namespaces and link. (The containers' shims name the run's
# directory in their command lines, so the shared cleanup kills them with everything else.)
cleanup_more() {
  # The pods' own processes (a killed shim leaves its container running): every process in
  # the kubelets' pod cgroups (w1's /kubepods, w2's /qsd-w2/kubepods; cgroup v1 here).
  local procs
  procs=$(find /sys/fs/cgroup/memory/kubepods /sys/fs/cgroup/memory/qsd-w2 -name cgroup.procs \
    -exec cat {} + 2>/dev/null)
  xargs -r kill -9 <<<"$procs" 2>/dev/null
  ip link delete qsdk0 2>/dev/null
  declare -F stop_second_node >/dev/null && stop_second_node
  losetup -a 2>/dev/null | grep -F "$work/" | cut -d: -f1 | xargs -r -n1 losetup -d 2>/dev/null
}
# shellcheck source=../lib/cluster.sh
. "$top/e2e/lib/cluster.sh"
agent_port=$(port) kubelet_port=$(port)
metrics_node=$(port) metrics_controller=$(port) prom_port=$(port)
prometheus=$("$top/scripts/build-prometheus") || { echo "kubelet: building Prometheus failed" >&2; summary 0 1; exit 1; }

# --- control plane -----------------------------------------------------------------------------
start_control_plane '*'
start kube-scheduler "$tools/kube-scheduler" --kubeconfig "$KUBECONFIG" --leader-elect=false --secure-port=0

# --- the node: containerd, CNI, kubelet ------------------------------------------------------------
# The kubelet's directory and the node's qsd-csi state directory are mounts of their own,
# shared, so that mounts made in the chart's pods (Bidirectional) reach the host and the pods.
mkdir -p "$work/kubelet" "$work/state" "$work/cni" "$work/containerd"
for d in "$work/kubelet" "$work/state"; do mount --bind "$d" "$d" && mount --make-rshared "$d"; done
cat >"$work/containerd.toml" <<TOML
# containerd 2.x (versions.yaml's, built by build-tools.sh), in the format its own default
# configuration uses. Every path is this run's own: no /etc/containerd imports, no socket
# under /run.
version = 4
root = "$work/containerd/root"
state = "$work/containerd/state"
imports = []
[plugins."io.containerd.server.v1.grpc"]
  address = "$work/containerd.sock"
[plugins."io.containerd.server.v1.ttrpc"]
  address = "$work/containerd.sock.ttrpc"
[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "registry.k8s.io/pause:$("$versions" images.pause)"
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "$work/registries"
[plugins."io.containerd.cri.v1.runtime"]
  # This machine withholds CAP_SYS_RESOURCE: no negative oom_score_adj for containers.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$tools/cni"]
    conf_dir = "$work/cni"
[plugins."io.containerd.grpc.v1.cri"]
  # exec and attach streams, for the API server's requests through the kubelet.
  stream_server_address = "127.0.0.1"
TOML
# Every image is imported from this run's archives; a pull of anything else must fail here, not
# reach out: every registry's only server is a closed port on 127.0.0.1 (no name lookups).
mkdir -p "$work/registries/_default"
echo 'server = "http://127.0.0.1:9"' >"$work/registries/_default/hosts.toml"
# A bridge of this run's own; pods reach nothing but this host's bridge address. Made here,
# before the first pod, because its address is also the node's (the kubelet refuses a
# loopback node address): the kubelet serves there, and the controller reaches the node agent
# there.
node_ip=10.88.0.1
if ! { ip link add qsdk0 type bridge && ip addr add "$node_ip/24" dev qsdk0 && ip link set qsdk0 up; }; then
  fail_start "the bridge qsdk0" containerd
fi
cat >"$work/cni/10-qsd.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "qsd-kubelet", "plugins": [
  {"type": "bridge", "bridge": "qsdk0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/24"}]], "routes": []}},
  {"type": "loopback"}]}
JSON
# Its runc shim is found on PATH, beside it.
PATH=$tools:$PATH start containerd "$tools/containerd" --config "$work/containerd.toml"
wait_until 30 test -S "$work/containerd.sock" || fail_start containerd containerd
for image in "${images[@]}"; do
  "$tools/ctr" --address "$work/containerd.sock" -n k8s.io images import "$image" >/dev/null \
    || fail_start "importing $image" containerd
done
cat >"$work/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 on this machine: kubelet >= 1.35 refuses it unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$work/containerd.sock
# The API server (exec, logs) proves itself with its client certificate from this run's CA.
authentication: {anonymous: {enabled: false}, webhook: {enabled: false}, x509: {clientCAFile: "$work/pki/ca.crt"}}
authorization: {mode: AlwaysAllow}
address: $node_ip
port: $kubelet_port
readOnlyPort: 0
healthzPort: 0
failSwapOn: false
resolvConf: ""
# Absolute floors: CI's disks are often nearly full, and 1% of a large one is gigabytes.
evictionHard: {memory.available: "100Mi", nodefs.available: "256Mi", imagefs.available: "256Mi"}
imageGCHighThresholdPercent: 100
podLogsDir: $work/pod-logs
# Pods are synced (and mounted filesystems grown after a resize) every 20 s, not every minute.
syncFrequency: 20s
YAML
kubelet() {
  start kubelet "$tools/kubelet" --kubeconfig "$KUBECONFIG" --config "$work/kubelet.yaml" \
    --root-dir "$work/kubelet" --hostname-override w1 --node-ip "$node_ip"
  echo $! >"$work/kubelet.pid"
}
kubelet
node_ready() { wait_field "$1" node/w1 '{.status.conditions[?(@.type=="Ready")].status}' True; }
node_ready 90 || fail_start "the kubelet (node Ready)" kubelet
if ((nodes == 2)); then
  # shellcheck source=second-node.sh
  . "$here/second-node.sh"
  start_second_node
fi

# --- qsd-csi: helm install ---------------------------------------------------------------------------
# Host-network pods on this one node: ports of this run's own, the API server at 127.0.0.1.
helm_values=(--set "node.kubeletDir=$work/kubelet" --set "node.stateDir=$work/state" --set node.device=fuse
  --set "node.agentPort=$agent_port" --set "node.healthPort=$(port)" --set controller.hostNetwork=true
  --set "controller.healthPort=$(port)" --set "kubernetesAPI.host=$api_host" --set "kubernetesAPI.port=$api_port"
  --set image.pullPolicy=Never --set "metrics.nodePort=$metrics_node" --set "metrics.controllerPort=$metrics_controller")
# Pods of the default namespace need its service account (and the e2e suite its own).
wait_until 60 kubectl get serviceaccount default || fail_start "the default service account" kube-controller-manager
capacities() { (($(kubectl -n qsd get csistoragecapacities -o name | grep -c .) >= nodes)); }
installed() {
  "$helm" install qsd "$top/charts/qsd-csi" --namespace qsd --create-namespace "${helm_values[@]}" \
    --wait --timeout 5m >/dev/null || { kubectl -n qsd get pods -o wide; return 1; }
  # Every pod of the chart Ready: the node plugin, its daemon, the controller and its sidecars.
  kubectl -n qsd wait --for=condition=Ready pod --all --timeout=60s >/dev/null || return 1
  [[ $(kubectl -n qsd get pods --no-headers | wc -l) == $((1 + 2 * nodes)) ]] || { kubectl -n qsd get pods; return 1; }
  # The node agent got its own certificate from the controller (a CSR the controller signed).
  wait_until 60 test -s "$work/state/tls/agent.crt" || return 1
  if ((nodes == 2)); then
    wait_until 60 test -s "$work/w2/state/tls/agent.crt" || return 1
    wait_field 60 csinode/w2 '{.spec.drivers[0].name}' qsd.csi.dev || return 1
  fi
  # The kubelet found the registrar's socket, asked it, then asked the node plugin: CSINode lists
  # the driver with its topology key, and the node carries its topology label.
  wait_field 60 csinode/w1 '{.spec.drivers[0].name}' qsd.csi.dev || return 1
  field_is csinode/w1 '{.spec.drivers[0].nodeID} {.spec.drivers[0].topologyKeys[0]}' "w1 topology.qsd.csi.dev/node" || return 1
  field_is node/w1 '{.metadata.labels.topology\.qsd\.csi\.dev/node}' w1 || return 1
  # Storage capacity tracking: csi-provisioner published each node's space for the chart's
  # class, so the scheduler can place pods of unbound claims.
  wait_until 90 capacities || { kubectl -n qsd get csistoragecapacities; return 1; }
}
check "helm install: the chart's pods Ready, its agent certified, the driver registered (CSINode)" installed
if ((failed)); then
  kubectl -n qsd describe pods | tail -40
  summary "$passed" "$failed"; exit 1
fi
# An xfs class, for online growth (growing a mounted ext4 needs CAP_SYS_RESOURCE, withheld here).
storage_class qsd-xfs '{csi.storage.k8s.io/fstype: xfs}'

# --- the tests ---------------------------------------------------------------------------------------
busybox="registry.k8s.io/e2e-test-images/busybox:$("$versions" images.busybox)"
pvc() { # NAME [SIZE] [MODE] [DATA SOURCE YAML] [CLASS]
  kubectl apply -f - <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1}
spec:
  storageClassName: ${5:-qsd-local}
  accessModes: [ReadWriteOnce]
  volumeMode: ${3:-Filesystem}
  resources: {requests: {storage: ${2:-64Mi}}}
  ${4:-}
YAML
}
# A pod that runs SCRIPT with claim CLAIM at /data (or, for a block claim, as /dev/qsd), on
# node w1 (or POD_NODE).
pod() { # NAME CLAIM SCRIPT [block]
  local mount="volumeMounts: [{name: v, mountPath: /data}]"
  [[ ${4:-} == block ]] && mount="volumeDevices: [{name: v, devicePath: /dev/qsd}]"
  kubectl apply -f - <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  nodeSelector: {kubernetes.io/hostname: ${POD_NODE:-w1}}
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
succeeded() { wait_for "pod/$1" '{.status.phase}' Succeeded 120 || { kubectl describe pod "$1" | tail -15; return 1; }; }
running() { kubectl wait --for=condition=Ready "pod/$1" --timeout=120s || { kubectl describe pod "$1" | tail -15; return 1; }; }
gone() { kubectl delete pod "$@" --wait --timeout=60s >/dev/null; }
# The Events with REASON on CLAIM, oldest first: "<eventTime> <note>".
events_on() { # CLAIM REASON (this claim's, by uid: an earlier claim of the name had its own)
  local uid; uid=$(field "pvc/$1" '{.metadata.uid}') || return 1
  field events '{range .items[*]}{.eventTime} {.message}{"\n"}{end}' \
    --field-selector "involvedObject.uid=$uid,reason=$2" | sort
}

persist() {
  pvc data && pod writer data 'echo written-by-a-pod >/data/f && sync && test -s /data/f' || return 1
  succeeded writer && gone writer || return 1
  pod reader data 'grep -qx written-by-a-pod /data/f' && succeeded reader && gone reader
}
check "a pod writes and syncs a file; the pod deleted, a new pod reads the same bytes" persist

# What later checks start from, made by the first that needs it (each check runs alone too):
# claim `data` holding /data/f, and snapshot `snap` of it taken before /data/later was written.
seeded() {
  kubectl get pvc data >/dev/null 2>&1 && return 0
  pvc data && pod seed data 'echo written-by-a-pod >/data/f && sync' && succeeded seed && gone seed
}
snapped() {
  seeded || return 1
  if ! kubectl get volumesnapshot snap >/dev/null 2>&1; then
    kubectl apply -f - <<YAML || return 1
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: snap}
spec: {volumeSnapshotClassName: qsd-snapshots, source: {persistentVolumeClaimName: data}}
YAML
    wait_for volumesnapshot/snap '{.status.readyToUse}' true 90 || return 1
    pod later data 'echo later >/data/later && sync' && succeeded later && gone later || return 1
  fi
  wait_for volumesnapshot/snap '{.status.readyToUse}' true 90
}

block() {
  pvc raw 32Mi Block || return 1
  pod blockpod raw 'printf qsd-block-bytes | dd of=/dev/qsd bs=512 seek=100 conv=fsync 2>/dev/null && dd if=/dev/qsd bs=512 skip=100 count=1 2>/dev/null | grep -q qsd-block-bytes' block || return 1
  succeeded blockpod && gone blockpod
}
check "a raw block claim (volumeMode: Block) used by a pod: bytes written and read back" block

restore() {
  snapped || return 1
  pvc restored 64Mi Filesystem "dataSource: {name: snap, kind: VolumeSnapshot, apiGroup: snapshot.storage.k8s.io}" || return 1
  pod checker restored 'grep -qx written-by-a-pod /data/f && test ! -e /data/later' && succeeded checker && gone checker
}
check "VolumeSnapshot, then a claim restored from it: a pod reads the earlier data, not the later" restore

clone() {
  snapped || return 1
  pvc cloned 64Mi Filesystem "dataSource: {name: data, kind: PersistentVolumeClaim}" || return 1
  pod clonecheck cloned 'grep -qx written-by-a-pod /data/f && test -e /data/later' && succeeded clonecheck && gone clonecheck
}
check "a clone claim (dataSource: PVC) holds the source's data" clone

# --- across nodes (QSD_CSI_KUBELET_NODES=2) -------------------------------------------------------
on_node() { # PVC NODE: whether the claim's volume lives on NODE (its ID names it)
  local pv; pv=$(field "pvc/$1" '{.spec.volumeName}') || return 1
  [[ $(field "pv/$pv" '{.spec.csi.volumeHandle}') == *"@$2:"* ]] ||
    { echo "$1 is $(field "pv/$pv" '{.spec.csi.volumeHandle}'), not on $2"; return 1; }
}
restore_elsewhere() {
  # w1's snapshot restored into a claim whose pod must run on w2: the scheduler picks w2, the
  # controller has w1 serve the snapshot and w2 pull it, and the pod reads the earlier data.
  snapped || return 1
  pvc restored-w2 64Mi Filesystem "dataSource: {name: snap, kind: VolumeSnapshot, apiGroup: snapshot.storage.k8s.io}" || return 1
  POD_NODE=w2 pod checker-w2 restored-w2 'grep -qx written-by-a-pod /data/f && test ! -e /data/later' &&
    succeeded checker-w2 && on_node restored-w2 w2 && gone checker-w2
}
clone_elsewhere() {
  # A pod on w1 appends numbered lines with fsync while its claim is cloned into a claim whose
  # pod runs on w2 (the copy held to 8 MiB/s over 40 MiB of other data, so the writer goes on
  # during it). The clone is one instant of the source: the data file whole, the lines a
  # prefix, each in its place; and the writer never stopped.
  storage_class qsd-slow-clone '{cloneBandwidth: 8Mi}' || return 1
  pvc busy 64Mi Filesystem "" qsd-slow-clone || return 1
  # shellcheck disable=SC2016 # the pod's shell expands these
  pod busy-writer busy 'dd if=/dev/urandom of=/data/big bs=1M count=40 conv=fsync 2>/dev/null && md5sum /data/big >/data/big.md5 && sync &&
    i=0; while true; do i=$((i+1)); echo $i >>/data/seq || exit 1; sync /data/seq || exit 1; sleep 0.05; done' &&
    running busy-writer || return 1
  wait_until 60 "$tools/kubectl" exec busy-writer -- test -s /data/seq || return 1
  pvc busy-w2 64Mi Filesystem "dataSource: {name: busy, kind: PersistentVolumeClaim}" qsd-slow-clone || return 1
  # shellcheck disable=SC2016 # the pod's shell expands these
  POD_NODE=w2 pod busy-check busy-w2 'cd /data && md5sum -c big.md5 >/dev/null &&
    awk "\$1 != NR { print \"line \" NR \": \" \$0; bad = 1 } END { print NR \" lines\"; exit bad || NR < 1 }" seq' || return 1
  succeeded busy-check || { kubectl logs busy-check; return 1; }
  on_node busy-w2 w2 || return 1
  local copied written
  copied=$(kubectl logs busy-check | awk '/ lines$/ { print $1 }')
  written=$(kubectl exec busy-writer -- wc -l /data/seq | cut -d' ' -f1)
  echo "the clone holds lines 1-$copied; the writer has written $written"
  field_is pod/busy-writer '{.status.phase}' Running && ((written > copied)) || return 1
  # The copy's progress and outcome reached the new claim.
  [[ -n $(events_on busy-w2 CloneCompleted) ]] || { echo "no CloneCompleted event"; return 1; }
  gone busy-writer busy-check && kubectl delete pvc busy busy-w2 --wait --timeout=90s >/dev/null
}
follow_done() { [[ -n $(events_on data-follow-0 VolumeFollowDone) ]]; }
state_of() { if [[ $1 == w1 ]]; then echo "$work/state"; else echo "$work/w2/state"; fi; }
follow_from=
follow_steps() {
  # A StatefulSet's pod writes 20 MiB and its checksum into a claim of a followPod class on
  # the node the scheduler picks. `kubectl drain` of that node (the set's pods) cordons it and
  # evicts the pod; its successor cannot go back, so the controller copies the volume to the
  # other node, points the PV there, and the pod runs there with the data; the old node keeps
  # no layer of the volume.
  storage_class qsd-follow '{followPod: "true"}' || return 1
  kubectl apply -f - >/dev/null <<YAML || return 1
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: follow}
spec:
  serviceName: follow
  replicas: 1
  selector: {matchLabels: {app: follow}}
  template:
    metadata: {labels: {app: follow}}
    spec:
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: 1
      dnsPolicy: Default
      containers:
        - name: c
          image: $busybox
          env: [{name: NODE, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}]
          command: ["/bin/sh", "-c", "cd /data && { test -e first || { dd if=/dev/urandom of=big bs=1M count=20 conv=fsync 2>/dev/null && md5sum big >big.md5 && echo \$NODE >first && sync; }; } && md5sum -c big.md5 && mkdir -p /tmp && touch /tmp/ok && exec sleep 3600"]
          readinessProbe: {exec: {command: [test, -e, /tmp/ok]}, periodSeconds: 1}
          volumeMounts: [{name: data, mountPath: /data}]
  volumeClaimTemplates:
    - metadata: {name: data}
      spec: {storageClassName: qsd-follow, accessModes: [ReadWriteOnce], resources: {requests: {storage: 64Mi}}}
YAML
  kubectl rollout status statefulset/follow --timeout=180s >/dev/null || { kubectl describe pod follow-0 | tail -15; return 1; }
  local from to pv handle head name
  from=$(field pod/follow-0 '{.spec.nodeName}') || return 1
  follow_from=$from
  if [[ $from == w1 ]]; then to=w2; else to=w1; fi
  on_node data-follow-0 "$from" || return 1
  pv=$(field pvc/data-follow-0 '{.spec.volumeName}') && handle=$(field "pv/$pv" '{.spec.csi.volumeHandle}') || return 1
  name=${handle##*:}
  head=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["head"])' "$(state_of "$from")/pools/default/volumes/$name.json") || return 1
  echo "the pod runs on $from; draining it"
  kubectl drain "$from" --pod-selector app=follow --timeout=120s >/dev/null || return 1
  if ! wait_field 300 pod/follow-0 '{.spec.nodeName}' "$to" || ! running follow-0; then
    kubectl describe pod follow-0 | tail -15; events_on data-follow-0 VolumeCannotFollow; return 1
  fi
  # The data the pod wrote on the first node (its checksum verified by the readiness probe).
  [[ $(kubectl exec follow-0 -- cat /data/first) == "$from" ]] || { echo "not the data written on $from"; return 1; }
  field_is "pv/$pv" '{.spec.csi.volumeHandle} {.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}' "$handle $to" || return 1
  [[ -n $(events_on data-follow-0 VolumeFollowed) ]] || { echo "no VolumeFollowed event"; return 1; }
  # The old copy goes once the pod uses the new one: no record or layer of it on the old node.
  wait_until 60 follow_done || { echo "no VolumeFollowDone event"; return 1; }
  local left; left=$(find "$(state_of "$from")/pools/default" -name "$name.json" -o -name "$head.*")
  [[ -z $left ]] || { echo "left on $from: $left"; return 1; }
}
follow() {
  # The set goes and the drained node takes pods again, pass or fail (the claim stays for
  # claims_deleted, which deletes it through the controller, where it now lives).
  follow_steps; local status=$?
  [[ -n $follow_from ]] && kubectl uncordon "$follow_from" >/dev/null
  kubectl delete statefulset follow --wait --timeout=60s >/dev/null
  wait_until 60 bash -c "! '$tools/kubectl' get pod follow-0 >/dev/null 2>&1" || status=1
  return $status
}
if ((nodes == 2)); then
  check "a claim restored from w1's snapshot for a pod on w2: copied across, the pod reads the snapshot's data" restore_elsewhere
  check "a claim in use on w1 cloned for a pod on w2 under a writer with fsync: one instant of it, the writer undisturbed" clone_elsewhere
  check "a volume follows its pod off a drained node: kubectl drain, the StatefulSet's pod runs on the other node with its data, the old node keeps no layer of it" follow
fi

grow() {
  # A running pod's xfs volume grown by patching its claim: the resizer grows the image, the
  # kubelet asks the node plugin to grow the mounted filesystem, and df in the pod sees it.
  pvc big 320Mi Filesystem "" qsd-xfs || return 1
  pod grower big 'touch /data/ready; while true; do sleep 1; done' && running grower || return 1
  local before; before=$(kubectl exec grower -- df -k /data | awk 'NR==2 {print $2}') || return 1
  kubectl patch pvc big -p '{"spec":{"resources":{"requests":{"storage":"640Mi"}}}}' >/dev/null || return 1
  # The kubelet grows a mounted filesystem on its next sync of the pod (syncFrequency).
  wait_field 180 pvc/big '{.status.capacity.storage}' 640Mi ||
    { kubectl describe pvc big | tail -8; return 1; }
  local after; after=$(kubectl exec grower -- df -k /data | awk 'NR==2 {print $2}') || return 1
  echo "df in the pod: ${before} KiB before, ${after} KiB after"
  (( after > before + 250 * 1024 )) && gone grower
}
check "kubectl patch grows a claim while its pod runs; df in the pod shows the new size (xfs)" grow

# --- thin provisioning: Prometheus, and claims that grow themselves --------------------------------
# A real Prometheus (built from the module proxy) finds the chart's metrics Services through
# the API server and scrapes the node plugin and the controller on the run's network.
cat >"$work/prometheus.yml" <<YAML
global: {scrape_interval: 2s, scrape_timeout: 2s}
scrape_configs:
  - job_name: qsd-csi
    kubernetes_sd_configs: [{role: endpointslice, kubeconfig_file: "$KUBECONFIG", namespaces: {names: [qsd]}}]
    relabel_configs:
      - {source_labels: [__meta_kubernetes_service_label_qsd_csi_dev_metrics], regex: "true", action: keep}
      - {source_labels: [__meta_kubernetes_endpointslice_port_name], regex: metrics, action: keep}
YAML
start prometheus "$prometheus/prometheus" --config.file="$work/prometheus.yml" \
  --storage.tsdb.path="$work/prometheus" --web.listen-address="127.0.0.1:$prom_port"
# One PromQL query's first value ("" when it has none).
promql() {
  python3 - "$prom_port" "$1" <<'PY'
import json, sys, urllib.parse, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/api/v1/query?" + urllib.parse.urlencode({"query": sys.argv[2]})
result = json.load(urllib.request.urlopen(url, timeout=10))["data"]["result"]
print(result[0]["value"][1] if result else "")
PY
}
promql_above() { # QUERY VALUE: whether the query's first value is above VALUE
  local v; v=$(promql "$1") && [[ -n $v ]] && python3 -c 'import sys; sys.exit(not float(sys.argv[1]) > float(sys.argv[2]))' "$v" "$2"
}
scraped() {
  # Both of the chart's metrics endpoints are up in Prometheus, and a pod's writes show up as
  # its claim's write bytes and allocation.
  wait_until 60 promql_above 'count(up{job="qsd-csi"} == 1)' 1 || { promql 'up'; tail -5 "$work/prometheus.log"; return 1; }
  # The pod stays after writing: a volume's I/O series exist while it is staged.
  pvc watched 256Mi || return 1
  pod watcher watched 'dd if=/dev/zero of=/data/f bs=1M count=96 conv=fsync 2>/dev/null && while true; do sleep 1; done' &&
    running watcher || return 1
  local claim='namespace="default",claim="watched"'
  wait_until 60 promql_above "qsd_csi_volume_write_bytes_total{$claim}" $((96 << 20)) ||
    { echo "write bytes: $(promql "qsd_csi_volume_write_bytes_total{$claim}")"; return 1; }
  wait_until 60 promql_above "qsd_csi_volume_allocated_bytes{$claim}" $((96 << 20)) ||
    { echo "allocated: $(promql "qsd_csi_volume_allocated_bytes{$claim}")"; return 1; }
  promql_above "sum(qsd_csi_grpc_request_duration_seconds_count{method=\"CreateVolume\",code=\"Ok\"})" 0 &&
    gone watcher && kubectl delete pvc watched --wait --timeout=90s >/dev/null
}

autogrow() {
  # A pod writes steadily into a 1 GiB claim of an auto-expanding class (limit 3 GiB) well past
  # 1 GiB, a second into a raw block claim (waiting at the device's end for it to grow). The
  # leader raises each claim's request as it fills, Kubernetes grows it, and neither writer
  # sees an I/O error; each claim ends at the limit with one AutoExpanded Event per growth.
  # Each writer prints the size it sees when it changes, with the host's uptime. The threshold
  # at 50 % leaves the growth half the filesystem's room (about 50 s of this writer): a growth
  # takes 1 to 30 s here (the kubelet grows a filesystem on its next sync), and at 70 % the
  # writer once filled a 1.5 GiB filesystem first on two nodes.
  storage_class qsd-auto '{csi.storage.k8s.io/fstype: xfs, writeThresholdPercent: "50", autoExpand: "true", autoExpandStep: "25%", autoExpandLimit: 3Gi}' || return 1
  # A round of its own: nothing of an earlier round's claims is left.
  kubectl delete pod autofs-writer autoblk-writer --ignore-not-found --wait --timeout=60s >/dev/null
  kubectl delete pvc autofs autoblk --ignore-not-found --wait --timeout=90s >/dev/null
  : >"$work/autogrow.txt"
  pvc autofs 1Gi Filesystem "" qsd-auto && pvc autoblk 1Gi Block "" qsd-auto || return 1
  # shellcheck disable=SC2016 # the pods' shells expand these
  pod autofs-writer autofs 'i=0; last=0
    while [ $i -lt 2560 ]; do
      dd if=/dev/zero of=/data/f bs=1M count=20 seek=$i conv=notrunc,fsync 2>/dev/null || { echo "write failed at ${i} MiB"; exit 1; }
      i=$((i + 20)); s=$(df -k /data | awk "NR == 2 { print \$2 * 1024 }")
      [ "$s" = "$last" ] || { echo "size $s at $(cut -d" " -f1 /proc/uptime)"; last=$s; }
      sleep 1
    done; echo done; while true; do sleep 1; done' || return 1
  # shellcheck disable=SC2016 # the pods' shells expand these
  pod autoblk-writer autoblk 'i=0; last=0
    while [ $i -lt 2560 ]; do
      s=$(blockdev --getsize64 /dev/qsd)
      [ "$s" = "$last" ] || { echo "size $s at $(cut -d" " -f1 /proc/uptime)"; last=$s; }
      if [ $(( (i + 20) * 1048576 )) -gt "$s" ]; then sleep 0.2; continue; fi
      dd if=/dev/zero of=/dev/qsd bs=1M count=20 seek=$i conv=fsync 2>/dev/null || { echo "write failed at ${i} MiB"; exit 1; }
      i=$((i + 20)); sleep 1
    done; echo done; while true; do sleep 1; done' block || return 1
  local w c
  # Each writer says "done" and stays: the kubelet finishes a claim's last resize (its status)
  # only while a pod uses it.
  for w in autofs-writer autoblk-writer; do
    wait_until 420 writer_done "$w" || { kubectl logs "$w" | tail -5; kubectl describe pod "$w" | tail -8; return 1; }
  done
  for c in autofs autoblk; do
    wait_field 120 "pvc/$c" '{.status.capacity.storage}' 3Gi || { kubectl describe pvc "$c" | tail -12; return 1; }
    local grown; grown=$(events_on "$c" AutoExpanded | wc -l)
    ((grown == 5)) || { echo "$c: $grown AutoExpanded events"; events_on "$c" AutoExpanded; return 1; }
    [[ -z $(events_on "$c" AutoExpandFailed) ]] || { events_on "$c" AutoExpandFailed; return 1; }
  done
  growth_latency autofs autofs-writer >"$work/autogrow.txt" &&
    growth_latency autoblk autoblk-writer >>"$work/autogrow.txt" || return 1
  gone autofs-writer autoblk-writer && kubectl delete pvc autofs autoblk --wait --timeout=90s >/dev/null
}
writer_done() { # POD: whether it wrote everything ("done") and still runs (a failed writer never says done)
  [[ $(field "pod/$1" '{.status.phase}') == Running ]] && kubectl logs "$1" | has -x 'done'
}
growth_latency() { # CLAIM WRITER: each growth seen in the pod, and how long after its Event
  python3 - "$(cut -d' ' -f1 /proc/uptime)" "$(date +%s.%N)" "$1" <(kubectl logs "$2") \
    <(events_on "$1" AutoExpanded) <<'PY'
import datetime, sys
uptime_now, wall_now, claim, log, events = float(sys.argv[1]), float(sys.argv[2]), *sys.argv[3:]
offset = wall_now - uptime_now
seen = [float(l.split()[-1]) + offset for l in open(log) if l.startswith("size ")][1:]
asked = [datetime.datetime.fromisoformat(l.split()[0].replace("Z", "+00:00")).timestamp() for l in open(events)]
lat = [s - a for s, a in zip(seen, asked)]
print(f"{claim}: {len(seen)} growths seen in the pod; AutoExpanded event -> new size seen: "
      + ", ".join(f"{x:.1f} s" for x in lat) + (f" (mean {sum(lat) / len(lat):.1f} s)" if lat else ""))
sys.exit(0 if len(seen) == len(asked) == 5 else 1)
PY
}
# QSD_CSI_THIN_ROUNDS=N runs these two checks N times in a row (each sets up and removes its
# own claims), for the five-in-a-row rule without five boots of the node.
rounds=${QSD_CSI_THIN_ROUNDS:-1}
for ((round = 1; round <= rounds; round++)); do
  of=""; ((rounds > 1)) && of=" (round $round of $rounds)"
  check "Prometheus scrapes the chart's metrics Services; a pod's writes show as its claim's write bytes and allocation$of" scraped
  check "claims of an auto-expanding class (xfs and block) grow under steady writers from 1 GiB to their 3 GiB limit: no I/O error, one event per growth$of" autogrow
  sed 's/^/  /' "$work/autogrow.txt" 2>/dev/null
done

# w1's node plugin pod.
plugin_pod() { field pods '{.items[0].metadata.name} {.items[0].metadata.uid}' -n qsd -l app.kubernetes.io/component=node --field-selector spec.nodeName=w1; }
plugin_replaced() { # OLD_UID: whether a node plugin pod other than OLD_UID runs on w1, every container Ready
  local p; p=$(field pods '{.items[0].metadata.uid} {.items[0].status.containerStatuses[*].ready}' \
    -n qsd -l app.kubernetes.io/component=node --field-selector spec.nodeName=w1)
  [[ ${p%% *} != "$1" && $p != *false* && $p == *true* ]]
}
plugin_ready_after() { # OLD_UID: a node plugin pod other than OLD_UID runs, every container Ready
  wait_until 120 plugin_replaced "$1" ||
    { kubectl -n qsd get pods; return 1; }
}
plugin_deleted() {
  # A pod appends numbered lines with fsync while the node plugin's pod is deleted; the
  # DaemonSet brings it back. The daemon (its own pod) keeps serving: no I/O error, and every
  # line verifies afterwards.
  seeded || return 1
  # shellcheck disable=SC2016 # the pod's shell expands these
  pod steady data 'i=0; while true; do i=$((i+1)); echo $i >>/data/seq || exit 1; sync /data/seq || exit 1; sleep 0.1; done' &&
    running steady || return 1
  local old; old=$(plugin_pod) || return 1
  wait_until 30 bash -c "(( \$('$tools/kubectl' exec steady -- wc -l /data/seq | cut -d' ' -f1) > 10 ))" || return 1
  kubectl -n qsd delete pod "${old% *}" --wait --timeout=90s >/dev/null || return 1
  plugin_ready_after "${old#* }" || return 1
  local n; n=$(kubectl exec steady -- wc -l /data/seq | cut -d' ' -f1) || return 1
  wait_until 30 bash -c "(( \$('$tools/kubectl' exec steady -- wc -l /data/seq | cut -d' ' -f1) > $n + 10 ))" ||
    { echo "the writer stopped"; return 1; }
  field_is pod/steady '{.status.phase}' Running || { echo "the writer failed"; return 1; }
  gone steady || return 1
  # shellcheck disable=SC2016 # the pod's shell expands these
  pod verify data 'awk "\$1 != NR { print \"line \" NR \": \" \$0; bad = 1 } END { exit bad || NR < 20 }" /data/seq' &&
    succeeded verify && gone verify
}
check "the node plugin pod deleted under a writer with fsync: back by its DaemonSet, no I/O error, data verifies" plugin_deleted

interrupted_steps() {
  # The node plugin's pod deleted, with no grace period, while it copies a claim in use into a
  # new claim (the class limits the copy to 8 MiB/s) and while a VolumeSnapshot of that claim
  # waits its turn (the copy holds the claim; the snapshotter retries). The DaemonSet brings
  # the plugin back Ready; its start completes or undoes what was in flight; the sidecars'
  # retries finish both, and each holds the claim's data.
  storage_class qsd-slow-clone '{cloneBandwidth: 8Mi}' || return 1
  pvc src 64Mi Filesystem "" qsd-slow-clone || return 1
  pod filler src 'dd if=/dev/urandom of=/data/big bs=1M count=40 conv=fsync 2>/dev/null && md5sum /data/big >/data/big.md5 && sync && touch /data/done; while true; do sleep 1; done' &&
    running filler || return 1
  wait_until 120 "$tools/kubectl" exec filler -- test -e /data/done || return 1
  local old; old=$(plugin_pod) || return 1
  pvc src-copy 64Mi Filesystem "dataSource: {name: src, kind: PersistentVolumeClaim}" qsd-slow-clone || return 1
  pod copycheck src-copy 'cd /data && md5sum -c big.md5' || return 1
  kubectl apply -f - >/dev/null <<YAML || return 1
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: src-snap}
spec: {volumeSnapshotClassName: qsd-snapshots, source: {persistentVolumeClaimName: src}}
YAML
  # The copy runs (the plugin logs each full clone it starts): kill the plugin there and then
  # (a deletion alone lets its graceful shutdown finish the copy), and delete its pod.
  wait_until 60 bash -c "'$tools/kubectl' -n qsd logs '${old% *}' -c qsd-csi | grep -q 'full clone started'" ||
    { echo "the clone never started"; return 1; }
  # w1's plugin: w2's has the same command line, in w2's network namespace.
  local pids p; mapfile -t pids < <(for p in $(pgrep -f -- "node --state-dir=$work/state"); do
    [[ $(readlink "/proc/$p/ns/net") == "$(readlink /proc/self/ns/net)" ]] && echo "$p"; done)
  ((${#pids[@]})) || { echo "no node plugin process"; return 1; }
  kill -KILL "${pids[@]}"
  kubectl -n qsd delete pod "${old% *}" --grace-period=0 --force >/dev/null 2>&1
  plugin_ready_after "${old#* }" || return 1
  # It died mid-copy: the new plugin cancelled the copy job the daemon still ran (its own pod)
  # and undid the new volume's half-made image.
  local new; new=$(plugin_pod) || return 1
  kubectl -n qsd logs "${new% *}" -c qsd-csi | has "cancelling a block job left by a restart" ||
    { echo "no copy job was left to cancel: the plugin was not deleted during the copy"; return 1; }
  kubectl -n qsd logs "${new% *}" -c qsd-csi | has "recovering an operation interrupted by a restart" ||
    { echo "no interrupted operation was recovered"; return 1; }
  wait_for volumesnapshot/src-snap '{.status.readyToUse}' true 180 || return 1
  succeeded copycheck && gone copycheck filler || return 1
  pvc src-restored 64Mi Filesystem "dataSource: {name: src-snap, kind: VolumeSnapshot, apiGroup: snapshot.storage.k8s.io}" qsd-slow-clone || return 1
  pod snapcheck src-restored 'cd /data && md5sum -c big.md5' && succeeded snapcheck && gone snapcheck
}
interrupted() {
  interrupted_steps; local status=$?
  # What the check made goes, pass or fail: later checks find only their own pods' mounts.
  kubectl delete pod filler copycheck snapcheck --ignore-not-found --wait --timeout=90s >/dev/null
  kubectl delete volumesnapshot src-snap --ignore-not-found --wait --timeout=90s >/dev/null
  kubectl delete pvc src src-copy src-restored --ignore-not-found --wait --timeout=90s >/dev/null
  return $status
}
check "the node plugin pod deleted during a clone and a snapshot of a claim in use: back Ready, both complete with the claim's data" interrupted

restart() {
  # A pod keeps writing while the kubelet is killed and started again.
  seeded || return 1
  # shellcheck disable=SC2016 # the pod's shell expands these
  pod keeper data 'i=0; while true; do i=$((i+1)); echo $i >/data/beat; sync; sleep 0.2; done' && running keeper || return 1
  local mnt; mnt=$(findmnt -rn -o TARGET | grep "$work/kubelet/pods/.*/volumes/kubernetes.io~csi/.*/mount$" | head -1)
  [[ -n $mnt ]] || { echo "no published mount"; return 1; }
  kill -9 "$(cat "$work/kubelet.pid")"; kubelet
  node_ready 60 || return 1
  local before; before=$(cat "$mnt/beat")
  wait_until 30 bash -c "(( \$(cat '$mnt/beat') > $before + 5 ))" || { echo "the pod stopped writing"; return 1; }
  findmnt "$mnt" >/dev/null && gone keeper
}
check "the kubelet restarted while a pod writes: the volume stays mounted and writable" restart

# --- Kubernetes' own external storage suite ------------------------------------------------------------
# e2e.test built from k8s.io/kubernetes at the cluster's version, with the driver as
# e2e/k8s-e2e/driver.yaml declares it; the patterns CI runs are in e2e/k8s-e2e/focus (README
# there), and with driver-ext4.yaml (ext4 by default) those of focus-ext4. Its log stays in the
# work directory; failures are shown.
k8s_e2e() {
  local focus focus_ext4 skip report=$work/k8s-e2e
  patterns() { grep -v '^#' "$top/e2e/k8s-e2e/$1" | grep . | paste -sd'|'; }
  focus=$(patterns focus) focus_ext4=$(patterns focus-ext4) skip=$(patterns skip)
  mkdir -p "$report"
  # Specs in parallel processes (ginkgo -p): most of a spec's time is waiting for pods and
  # namespaces, not CPU.
  (cd "$top/e2e/k8s-e2e" && "$tools/ginkgo" --procs="${QSD_CSI_K8S_E2E_PROCS:-4}" --no-color \
    --focus="External.Storage \[Driver: qsd.csi.dev\].*($focus)|External.Storage \[Driver: qsd.csi.dev-ext4\].*($focus_ext4)" \
    --skip="$skip" --timeout=40m \
    --output-dir="$report" --junit-report=junit.xml "$tools/e2e.test" -- \
    --kubeconfig "$KUBECONFIG" --kubectl-path "$tools/kubectl" --kubelet-root-dir "$work/kubelet" \
    --storage.testdriver="$top/e2e/k8s-e2e/driver.yaml" --storage.testdriver="$top/e2e/k8s-e2e/driver-ext4.yaml" \
    --repo-root "$top/e2e/k8s-e2e" \
    --report-dir "$report") >"$work/k8s-e2e.log" 2>&1
  local status=$?
  /usr/bin/python3 - "$report/junit.xml" <<'PY2'
import sys, xml.etree.ElementTree as ET
passed = failed = skipped = 0
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    name = case.get("name", "")
    if not name.startswith("[It]"):  # the suite's set-up and reporting nodes
        continue
    skip = case.find("skipped")
    if skip is not None:
        # Specs the focus filtered out are listed too ("skipped"); count the ones of this
        # driver that the suite itself skipped (a capability the driver does not declare).
        if "[Driver: qsd.csi.dev" in name and skip.get("message", "skipped") != "skipped":
            skipped += 1
    elif case.find("failure") is not None or case.find("error") is not None:
        failed += 1
        print(f"k8s-e2e: FAIL {name}")
    else:
        passed += 1
        print(f"k8s-e2e: ok {name}")
print(f"k8s-e2e: {passed} passed, {failed} failed, {skipped} skipped")
PY2
  return $status
}
if [[ ${QSD_CSI_K8S_E2E:-1} != 0 ]]; then
  k8s_e2e_out=$(k8s_e2e); k8s_e2e_status=$?
  echo "$k8s_e2e_out" | grep -v ' skipped$' | grep -v '^k8s-e2e: [0-9]'
  if ((k8s_e2e_status)); then grep -B2 -A20 '\[FAILED\]' "$work/k8s-e2e.log" | tail -60; fi
fi

claims_deleted() {
  # Pods, the snapshot and the claims deleted while the driver runs: no volume, layer, mount or
  # device is left.
  kubectl delete pod --all --wait --timeout=90s >/dev/null || return 1
  kubectl delete volumesnapshot --all --wait --timeout=90s >/dev/null || return 1
  kubectl delete pvc --all --wait --timeout=90s >/dev/null || return 1
  wait_until 90 bash -c "out=\$('$tools/kubectl' get pv -o name) && [[ -z \$out ]]" || { kubectl get pv; return 1; }
  # (The chart's pods still run: their own secret and token volumes stay.)
  local left; left=$(findmnt -rn -o TARGET | grep -E "^$work/(kubelet|state)/" | grep -Ev "^$work/kubelet/pods/[^/]*/volumes/kubernetes.io~(projected|secret|configmap)/")
  [[ -z $left ]] || { echo "mounts left: $left"; return 1; }
  local pool records
  for pool in "$work/state/pools/default" $( ((nodes == 2)) && echo "$work/w2/state/pools/default"); do
    records=$(find "$pool/volumes" "$pool/snapshots" "$pool/layers" -mindepth 1)
    [[ -z $records ]] || { echo "left in the pool: $records"; return 1; }
  done
  ! losetup -a | has "$work" || { losetup -a | grep "$work"; return 1; }
}
check "pods, snapshot and claims deleted: no volume, snapshot, layer, mount or device left" claims_deleted
if ((failed)); then
  for c in node:qsd-csi controller:qsd-csi controller:csi-provisioner controller:csi-resizer daemon:qemu-storage-daemon; do
    echo "--- ${c#*:} in the ${c%%:*} pod (last lines)"
    kubectl -n qsd logs -l "app.kubernetes.io/component=${c%%:*}" -c "${c#*:}" --tail=12 | cut -c1-400
  done
fi

uninstalled() {
  # helm uninstall: the chart's pods go, the daemon with them, and the driver is unregistered.
  "$helm" uninstall qsd --namespace qsd --wait --timeout 2m >/dev/null || return 1
  wait_until 90 bash -c "out=\$('$tools/kubectl' -n qsd get pods -o name) && [[ -z \$out ]]" || { kubectl -n qsd get pods; return 1; }
  wait_field 60 csinode/w1 '{.spec.drivers[*].name}' '' ||
    { echo "the driver is still registered"; return 1; }
  ! pgrep -f "qemu-storage-daemon.*$work" >/dev/null || { echo "a daemon still runs"; return 1; }
  local left; left=$(findmnt -rn -o TARGET | grep -E "^$work/(kubelet|state)/")
  [[ -z $left ]] || { echo "mounts left: $left"; return 1; }
}
check "helm uninstall: the chart's pods and daemon gone, the driver unregistered, no mount left" uninstalled

if ((failed)); then
  for l in kubelet containerd; do echo "--- $l (last lines)"; tail -8 "$work/$l.log"; done
fi
[[ -n ${k8s_e2e_out:-} ]] && echo "$k8s_e2e_out" | tail -1
summary "$passed" "$failed"
((failed == 0 && ${k8s_e2e_status:-0} == 0))
