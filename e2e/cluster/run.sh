#!/usr/bin/env bash
# qsd-csi in a real control plane, run as local processes: etcd, kube-apiserver,
# kube-controller-manager (the persistent-volume controllers), snapshot-controller with its
# CRDs, and the CSI sidecars (csi-provisioner with topology, csi-snapshotter, csi-resizer),
# all built from the Go module proxy (build-tools.sh); our `qsd-csi node` and
# `qsd-csi controller`, the controller finding the node's agent from its pod object.
# The chart's cluster objects (CSIDriver, StorageClass, VolumeSnapshotClass, RBAC, the agent CA
# and the controller's certificate) come from `helm template` and are applied with kubectl. The
# node's agent certificate is its own: the node plugin asks for it with a CertificateSigningRequest
# made with a token bound to its pod object, and the controller signs it (docs/security.md).
#
# There is no kubelet and no container runtime here: what they would do is done by hand —
# the Node and CSINode objects the kubelet and node-driver-registrar publish, the node pod's
# object with its address, the scheduler's selected-node annotation, and stage / publish
# through the node plugin's CSI socket with the data checked on the mounts.
# Ends with the summary line "cluster: N passed, N failed, N skipped".
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
k8s=${QSD_CSI_K8S_VERSION:-$("$top/scripts/versions" kubernetes)}
tools=$top/target/tools/cluster-$k8s
helm=$top/target/tools/helm-$("$top/scripts/versions" helm)/helm

"$here/build-tools.sh" >/dev/null || { echo "cluster: building the control plane failed" >&2; echo "cluster: 0 passed, 1 failed, 0 skipped"; exit 1; }
[[ -x $helm ]] || "$top/e2e/chart/run.sh" >/dev/null 2>&1 || true # builds helm
(cd "$top" && cargo build --quiet -p qsd-csi --bin qsd-csi) || exit 1
qsd_csi=$top/target/debug/qsd-csi

suite=cluster failed_line="cluster: 0 passed, 1 failed, 0 skipped"
# shellcheck source=../lib/cluster.sh
. "$top/e2e/lib/cluster.sh"
agent_port=$(port)
# Prometheus metrics: the node plugin's and each controller's.
node_metrics=$(port) ctl1_metrics=$(port) ctl2_metrics=$(port)
promtool=$("$top/scripts/build-prometheus")/promtool || { echo "cluster: building promtool failed" >&2; echo "cluster: 0 passed, 1 failed, 0 skipped"; exit 1; }

# --- control plane ---------------------------------------------------------------------------
start_control_plane persistentvolume-binder-controller,persistentvolume-expander-controller,persistentvolumeclaim-protection-controller,persistentvolume-protection-controller,resourcequota-controller

# --- the chart's cluster objects -------------------------------------------------------------
kubectl create namespace qsd >/dev/null
{ render_chart && apply_chart_objects; } || { echo "cluster: 0 passed, 1 failed, 0 skipped"; exit 1; }

# --- the node "w1", as the kubelet and node-driver-registrar would publish it ----------------
kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata: {name: w1, labels: {kubernetes.io/hostname: w1, topology.qsd.csi.dev/node: w1}}
---
apiVersion: storage.k8s.io/v1
kind: CSINode
metadata: {name: w1}
spec:
  drivers: [{name: qsd.csi.dev, nodeID: w1, topologyKeys: [topology.qsd.csi.dev/node]}]
---
apiVersion: v1
kind: Pod
metadata:
  name: qsd-qsd-csi-node-w1
  namespace: qsd
  labels: {app.kubernetes.io/instance: qsd, app.kubernetes.io/component: node}
spec:
  nodeName: w1
  hostNetwork: true
  serviceAccountName: qsd-qsd-csi-node
  automountServiceAccountToken: false
  containers: [{name: qsd-csi, image: qsd-csi}]
EOF
kubectl -n qsd patch pod qsd-qsd-csi-node-w1 --subresource=status --type=merge \
  -p '{"status":{"podIP":"127.0.0.1","podIPs":[{"ip":"127.0.0.1"}]}}' >/dev/null \
  || { echo "cluster: 0 passed, 1 failed, 0 skipped"; exit 1; }

# --- qsd-csi: the node plugin and the controller ----------------------------------------------
# The node plugin runs on a token of the chart's node service account bound to its pod object,
# as the kubelet would give the pod: with it, it asks for its agent certificate.
node_token=$(kubectl -n qsd create token qsd-qsd-csi-node --bound-object-kind Pod \
  --bound-object-name qsd-qsd-csi-node-w1 --duration=2h) || { echo "cluster: 0 passed, 1 failed, 0 skipped"; exit 1; }
sed "s/$admin_token/$node_token/" "$KUBECONFIG" >"$work/node.kubeconfig"
KUBECONFIG=$work/node.kubeconfig start node "$qsd_csi" --endpoint "unix://$work/node.sock" node \
  --state-dir "$work/state" --node w1 --device fuse --agent-listen "127.0.0.1:$agent_port" \
  --tls-bootstrap --tls-ca "$work/tls/bundle.crt" --metrics-listen "127.0.0.1:$node_metrics"
wait_until 60 test -S "$work/node.sock" || fail_start "the node plugin" node
# The controller and the sidecars use the chart's service account (a token from the
# TokenRequest API), so the chart's RBAC is what they are allowed: nothing more.
sa_token=$(kubectl -n qsd create token qsd-qsd-csi-controller --duration=2h) \
  || { echo "cluster: 0 passed, 1 failed, 0 skipped"; exit 1; }
sed "s/$admin_token/$sa_token/" "$KUBECONFIG" >"$work/sa.kubeconfig"
# Two controller replicas with leader election: ctl-1 starts first and holds the Lease (it
# relays the node's events); the sidecars talk to ctl-2, which serves CSI as a follower.
controller() { # IDENTITY SOCKET METRICS-PORT
  KUBECONFIG=$work/sa.kubeconfig POD_NAMESPACE=qsd POD_NAME=$1 start "$1" "$qsd_csi" \
    --endpoint "unix://$2" controller --leader-elect --metrics-listen "127.0.0.1:$3" \
    --discover-agents app.kubernetes.io/instance=qsd,app.kubernetes.io/component=node \
    --agent-port "$agent_port" --node-service-account qsd-qsd-csi-node \
    --signing-ca-cert "$work/tls/ca.crt" --signing-ca-key "$work/tls/ca.key" \
    --tls-cert "$work/tls/tls.crt" --tls-key "$work/tls/tls.key" --tls-ca "$work/tls/ca.crt"
}
holder() { field lease/qsd-csi-controller '{.spec.holderIdentity}' -n qsd; }
controller ctl-1 "$work/ctl1.sock" "$ctl1_metrics"
wait_until 60 test -S "$work/ctl1.sock" || fail_start "the first controller" ctl-1
wait_field 30 lease/qsd-csi-controller '{.spec.holderIdentity}' ctl-1 -n qsd \
  || fail_start "the first controller's leadership" ctl-1
ctl1_pid=${pids[-1]}
controller ctl-2 "$work/ctl.sock" "$ctl2_metrics"
wait_until 60 test -S "$work/ctl.sock" || fail_start "the second controller" ctl-2
ctl2_pid=${pids[-1]}
start_sidecars "$work/sa.kubeconfig" "$work/ctl.sock"

# --- the tests -------------------------------------------------------------------------------

agent_certificate() {
  # The node asked, the leader signed: a certificate naming w1 alone, for server auth only,
  # from the chart's CA; the key stayed on the node (0600).
  wait_until 60 grep -q "serving the node agent over mutual TLS" "$work/node.log" || return 1
  local crt=$work/state/tls/agent.crt
  openssl verify -CAfile "$work/tls/ca.crt" "$crt" || return 1
  openssl x509 -in "$crt" -noout -subject | has -x 'subject=CN = w1' || return 1
  openssl x509 -in "$crt" -noout -ext subjectAltName | has -x ' *DNS:w1' || return 1
  [[ $(openssl x509 -in "$crt" -noout -ext extendedKeyUsage | tail -1 | tr -d ' ') == TLSWebServerAuthentication ]] || return 1
  [[ $(stat -c %a "$work/state/tls/agent.key") == 600 ]] || return 1
  field csr '{range .items[*]}{.spec.signerName} {.status.conditions[0].type} {.status.conditions[0].reason}{"\n"}{end}' \
    | has -x 'qsd.csi.dev/node-agent Approved NodePluginVerified' || return 1
  grep -q "signed a node agent certificate" "$work/ctl-1.log"
}
check "the node's agent certificate: asked for with its pod's token, signed by the leader for w1 only" agent_certificate

forged() {
  # A request for another node's name, made with w1's own token; and one made by a user. The
  # signer denies both, saying why.
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/forged.key" \
    -subj /CN=w2 -addext subjectAltName=DNS:w2 -out "$work/forged.csr" 2>/dev/null || return 1
  local req config who; req=$(base64 -w0 <"$work/forged.csr")
  for who in node admin; do
    config=$work/node.kubeconfig; [[ $who == admin ]] && config=$KUBECONFIG
    printf '%s\n' "apiVersion: certificates.k8s.io/v1" "kind: CertificateSigningRequest" \
      "metadata: {name: forged-by-$who}" \
      "spec: {request: $req, signerName: qsd.csi.dev/node-agent, usages: [digital signature, server auth]}" \
      | "$tools/kubectl" --kubeconfig "$config" create -f - || return 1
  done
  for who in node admin; do
    wait_field 30 "csr/forged-by-$who" '{.status.conditions[0].type}' Denied \
      || { kubectl get csr forged-by-$who -o yaml; return 1; }
  done
  field csr/forged-by-node '{.status.conditions[0].message}' | has 'must be exactly CN="w1"' || return 1
  field csr/forged-by-admin '{.status.conditions[0].message}' | has 'requested by "admin"' || return 1
  [[ -z $(field csr '{.items[*].status.certificate}' forged-by-node forged-by-admin) ]]
}
check "a node asking for another node's name, and a user asking at all, are denied" forged
pvc() { # NAME [SIZE] [DATA SOURCE YAML] [CLASS]
  kubectl apply -f - <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: $1
  namespace: default
  # What the scheduler sets for a WaitForFirstConsumer class once the pod has a node.
  annotations: {volume.kubernetes.io/selected-node: w1}
spec:
  storageClassName: ${4:-qsd-local}
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: ${2:-64Mi}}}
  ${3:-}
EOF
}
bound() { wait_for "pvc/$1" '{.status.phase}' Bound 90; }
handle() { field "pv/$(field "pvc/$1" '{.spec.volumeName}')" '{.spec.csi.volumeHandle}'; }
# Stage + publish through the node plugin's socket, as the kubelet would.
publish() {
  local pv context=(); pv=$(field "pvc/$1" '{.spec.volumeName}')
  # The PV's volumeAttributes are the volume context the kubelet passes.
  # shellcheck disable=SC2016 # a Go template, not shell: kubectl expands it
  mapfile -t context < <(kubectl get pv "$pv" -o go-template='{{range $k, $v := .spec.csi.volumeAttributes}}--context={{$k}}={{$v}}{{"\n"}}{{end}}')
  "$qsd_csi" --endpoint "unix://$work/node.sock" publish "$(handle "$1")" "$work/mnt-$1" --staging-dir "$work/staging" "${context[@]}"
}
# The Events on a claim with a reason, one line each: "<reporting instance> <note>".
events() { # CLAIM REASON
  field events '{range .items[*]}{.reportingInstance} {.message}{"\n"}{end}' \
    -n default --field-selector "involvedObject.name=$1,reason=$2"
}
has_event() { [[ -n $(events "$@") ]]; }
# Waits until an Event with REASON on CLAIM was reported by INSTANCE.
event_from() { # CLAIM REASON INSTANCE
  local deadline=$((SECONDS + 30))
  until events "$1" "$2" | has "^$3 "; do
    ((SECONDS < deadline)) || { echo "no $2 event from $3 on $1:"; events "$1" "$2"; return 1; }
    sleep 0.2
  done
}
unpublish() { "$qsd_csi" --endpoint "unix://$work/node.sock" unpublish "$(handle "$1")" "$work/mnt-$1" --staging-dir "$work/staging"; }

first_pvc() {
  pvc data && bound data || return 1
  [[ $(handle data) == vol:default@w1:* ]] || { echo "volume handle $(handle data)"; return 1; }
  publish data && echo before >"$work/mnt-data/before" && sync
}
check "pvc bound: created by our controller on node w1, published, written" first_pvc

# What later checks start from, made by the first that needs it (each check runs alone too,
# QSD_CSI_CHECKS): claim `data` published with file `before`; snapshot `snap` of it, taken
# before `after` was written; claim `cloned`, a clone of `data` then, published.
seeded() { kubectl get pvc data >/dev/null 2>&1 || first_pvc; }
snapped() {
  seeded || return 1
  kubectl get volumesnapshot snap >/dev/null 2>&1 && return 0
  kubectl apply -f - <<EOF || return 1
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: snap, namespace: default}
spec: {volumeSnapshotClassName: qsd-snapshots, source: {persistentVolumeClaimName: data}}
EOF
  wait_for volumesnapshot/snap '{.status.readyToUse}' true 90 || return 1
  echo after >"$work/mnt-data/after" && sync
}
cloned_claim() {
  snapped || return 1
  kubectl get pvc cloned >/dev/null 2>&1 && return 0
  pvc cloned 64Mi "dataSource: {name: data, kind: PersistentVolumeClaim}" && bound cloned && publish cloned
}

snapshot() {
  snapped || return 1
  # Posted by ctl-2, the replica that served the call.
  event_from data SnapshotTaken ctl-2 || return 1
  events data SnapshotTaken | has "^ctl-2 VolumeSnapshot default/snap taken as snap:default@w1:"
}
check "volumesnapshot ready to use; a SnapshotTaken event on the claim" snapshot

restore() {
  snapped || return 1
  pvc restored 64Mi "dataSource: {name: snap, kind: VolumeSnapshot, apiGroup: snapshot.storage.k8s.io}" \
    && bound restored && publish restored || return 1
  [[ -f $work/mnt-restored/before && ! -e $work/mnt-restored/after ]] || { ls "$work/mnt-restored"; return 1; }
}
check "pvc restored from the snapshot: earlier files present, later ones absent" restore

clone() {
  cloned_claim || return 1
  [[ -f $work/mnt-cloned/before && -f $work/mnt-cloned/after ]] || { ls "$work/mnt-cloned"; return 1; }
  # Reported by the node's engine, relayed by the leader ctl-1.
  event_from cloned CloneCompleted ctl-1 || return 1
  events cloned CloneCompleted | has "^ctl-1 volume vol:default@w1:.* is a complete point-in-time copy of vol:default@w1:"
}
check "pvc cloned from the first: its files present; a CloneCompleted event on the claim" clone

folded() {
  # The same failure twice (a snapshot name already taken by another volume's snapshot): one
  # SnapshotFailed Event on the claim, counted twice.
  cloned_claim || return 1
  local taken; taken=$(field volumesnapshotcontent '{.items[0].status.snapshotHandle}')
  for _ in 1 2; do
    "$qsd_csi" --endpoint "unix://$work/ctl.sock" snapshot create "$(handle cloned)" "${taken##*:}" \
      && { echo "the snapshot name was not refused"; return 1; }
  done
  wait_field 30 events '{.items[*].series.count}' 2 \
    -n default --field-selector involvedObject.name=cloned,reason=SnapshotFailed \
    || { kubectl get events -n default --field-selector involvedObject.name=cloned -o yaml; return 1; }
  events cloned SnapshotFailed | has "^ctl-2 snapshot \"${taken##*:}\" failed (AlreadyExists)"
}
check "the same failure twice is one SnapshotFailed event on the claim, counted twice" folded

expand() {
  seeded || return 1
  kubectl patch pvc data --type=merge -p '{"spec":{"resources":{"requests":{"storage":"128Mi"}}}}' || return 1
  local pv; pv=$(field pvc/data '{.spec.volumeName}')
  wait_for "pv/$pv" '{.spec.capacity.storage}' 128Mi 90 || return 1
  # Node expansion is the kubelet's: the claim waits for it.
  kubectl wait --for=condition=FileSystemResizePending pvc/data --timeout=60s
}
check "kubectl patch grows the volume through csi-resizer" expand

recover() {
  # An expansion the driver refuses (past its 64 TiB maximum) is retried by the user with a
  # smaller size (Kubernetes' RecoverVolumeExpansionFailure, GA): accepted, and the claim's
  # volume grows to it.
  pvc recover 64Mi && bound recover || return 1
  kubectl patch pvc recover --type=merge -p '{"spec":{"resources":{"requests":{"storage":"100Ti"}}}}' || return 1
  wait_field 60 pvc/recover '{.status.allocatedResourceStatuses.storage}' ControllerResizeInfeasible \
    || { kubectl get pvc recover -o yaml | tail -20; return 1; }
  kubectl patch pvc recover --type=merge -p '{"spec":{"resources":{"requests":{"storage":"96Mi"}}}}' || return 1
  wait_for "pv/$(field pvc/recover '{.spec.volumeName}')" '{.spec.capacity.storage}' 96Mi 90
}
check "an expansion refused as too large, retried smaller by the user, is accepted (RecoverVolumeExpansionFailure)" recover

alert() {
  storage_class qsd-alerts '{pool: default, fsType: ext4, writeThresholdPercent: "20"}' || return 1
  pvc alert 128Mi "" qsd-alerts && bound alert && publish alert || return 1
  # 40 MiB of data: allocation passes 20 % of 128 MiB.
  dd if=/dev/urandom of="$work/mnt-alert/a" bs=1M count=40 conv=fsync status=none || return 1
  event_from alert WriteThresholdCrossed ctl-1 || return 1
  events alert WriteThresholdCrossed | has "^ctl-1 volume vol:default@w1:.* has allocated .* of 128.0 MiB" ||
    { echo "the events:"; events alert WriteThresholdCrossed; return 1; }
  # Only the leader relays: the follower posted nothing.
  ! events alert WriteThresholdCrossed | grep '^ctl-2 '
}
check "a thin volume's allocation past writeThresholdPercent: a WriteThresholdCrossed event on the claim" alert

grow() {
  # A claim of an auto-expanding class whose filesystem fills past its threshold: the leader
  # raises the claim's request by the step, csi-resizer grows the volume, and an AutoExpanded
  # Event says from what to what. (The filesystem's own growth is the kubelet's: the kubelet
  # suite has one.)
  storage_class qsd-grow '{pool: default, fsType: ext4, writeThresholdPercent: "50", autoExpand: "true", autoExpandStep: 64Mi, autoExpandLimit: 256Mi}' || return 1
  pvc grow 64Mi "" qsd-grow && bound grow && publish grow || return 1
  dd if=/dev/urandom of="$work/mnt-grow/a" bs=1M count=40 conv=fsync status=none || return 1
  wait_field 60 pvc/grow '{.spec.resources.requests.storage}' 128Mi || return 1
  wait_for "pv/$(field pvc/grow '{.spec.volumeName}')" '{.spec.capacity.storage}' 128Mi 90 || return 1
  event_from grow AutoExpanded ctl-1 || return 1
  events grow AutoExpanded | has "^ctl-1 volume vol:default@w1:.* grows from 64.0 MiB to 128.0 MiB (step 64.0 MiB, limit 256.0 MiB): .*; claim default/grow's request raised from 64.0 MiB to 128.0 MiB (128Mi)" \
    || { events grow AutoExpanded; return 1; }
}
check "a filling claim of an auto-expanding class: the leader raises its request, csi-resizer grows it, an AutoExpanded event says so" grow

quota() {
  # A ResourceQuota on the class's storage: the next growth would pass it, so the API server
  # refuses the raised request. A Warning Event says so (repeats fold into it), the claim keeps
  # its size, and the volume keeps working.
  kubectl apply -f - <<EOF || return 1
apiVersion: v1
kind: ResourceQuota
metadata: {name: grow-quota, namespace: default}
spec: {hard: {qsd-grow.storageclass.storage.k8s.io/requests.storage: 200Mi}}
EOF
  pvc capped 64Mi "" qsd-grow && bound capped && publish capped || return 1
  dd if=/dev/urandom of="$work/mnt-capped/a" bs=1M count=44 conv=fsync status=none || return 1
  event_from capped AutoExpandFailed ctl-1 || return 1
  events capped AutoExpandFailed | has "^ctl-1 volume vol:default@w1:.* could not grow from 64.0 MiB to 128.0 MiB: the API server refused .*exceeded quota: grow-quota" \
    || { events capped AutoExpandFailed; return 1; }
  [[ $(field pvc/capped '{.spec.resources.requests.storage}') == 64Mi ]] || return 1
  dd if=/dev/urandom of="$work/mnt-capped/b" bs=1M count=4 conv=fsync status=none || return 1
  local posted; posted=$(events capped AutoExpandFailed | wc -l)
  ((posted == 1)) || { echo "$posted AutoExpandFailed events"; return 1; }
}
check "a growth a ResourceQuota refuses: a Warning event says so, once; the claim keeps its size and works" quota

scrape() { python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' "http://127.0.0.1:$1/metrics"; }
metrics() {
  # Every scrape passes promtool; the node's shows the grown claim's size, the leader's its
  # growth, and both controllers' the CSI calls they served.
  local who text
  for who in node:$node_metrics ctl-1:$ctl1_metrics ctl-2:$ctl2_metrics; do
    text=$(scrape "${who#*:}") || return 1
    "$promtool" check metrics <<<"$text" || { echo "promtool check metrics failed on ${who%%:*}"; return 1; }
  done
  local deadline=$((SECONDS + 30))
  until scrape "$node_metrics" | has '^qsd_csi_volume_size_bytes{claim="grow",namespace="default",pool="default",volume="vol:default@w1:[^"]*"} 134217728$'; do
    ((SECONDS < deadline)) || { scrape "$node_metrics" | grep '^qsd_csi_volume_size_bytes'; return 1; }
    sleep 0.2
  done
  scrape "$ctl1_metrics" | has '^qsd_csi_volume_auto_expansions_total{claim="grow",namespace="default",.*} 1$' \
    || { scrape "$ctl1_metrics" | grep auto_exp; return 1; }
  scrape "$ctl2_metrics" | has '^qsd_csi_grpc_request_duration_seconds_count{code="Ok",method="CreateVolume",service="csi.v1.Controller"}'
}
check "the node plugin's and the controllers' metrics pass promtool check metrics and show the claims" metrics

failover() {
  [[ $(holder) == ctl-1 ]] || { echo "holder $(holder)"; return 1; }
  kill -9 "$ctl1_pid"
  # The Lease runs out (15 s without renewal); ctl-2 takes it and starts relaying.
  wait_field 40 lease/qsd-csi-controller '{.spec.holderIdentity}' ctl-2 -n qsd \
    || { echo "holder $(holder)"; return 1; }
  wait_until 30 grep -q "watching the node's volume events" "$work/ctl-2.log" || return 1
  dd if=/dev/urandom of="$work/mnt-alert/b" bs=1M count=16 conv=fsync status=none || return 1
  event_from alert WriteThresholdCrossed ctl-2
}
check "the leader SIGKILLed: the other replica takes the Lease and relays the next alert" failover

group() {
  # Two claims of one group, each marked with its name, snapshotted together; written to
  # after; each member restored holds one claim's mark and nothing written later.
  local c m i=0 seen=() content handle members
  for c in g1 g2; do
    pvc "$c" && kubectl label pvc "$c" qsd-group=pair && bound "$c" && publish "$c" || return 1
    echo "$c" >"$work/mnt-$c/who" || return 1
  done
  sync
  kubectl apply -f - <<EOF || return 1
apiVersion: groupsnapshot.storage.k8s.io/v1
kind: VolumeGroupSnapshot
metadata: {name: pair, namespace: default}
spec:
  volumeGroupSnapshotClassName: qsd-group-snapshots
  source: {selector: {matchLabels: {qsd-group: pair}}}
EOF
  wait_for volumegroupsnapshot/pair '{.status.readyToUse}' true 90 \
    || { kubectl get volumegroupsnapshot pair -o yaml; return 1; }
  for c in g1 g2; do echo after >"$work/mnt-$c/after" || return 1; done
  sync
  content=$(field volumegroupsnapshot/pair '{.status.boundVolumeGroupSnapshotContentName}')
  handle=$(field "volumegroupsnapshotcontent/$content" '{.status.volumeGroupSnapshotHandle}')
  [[ $handle == group:default@w1:* ]] || { echo "group handle: $handle"; return 1; }
  # snapshot-controller makes the member VolumeSnapshots after the group is ready.
  local deadline=$((SECONDS + 60))
  while :; do
    mapfile -t members < <(field volumesnapshot \
      '{range .items[?(@.status.volumeGroupSnapshotName=="pair")]}{.metadata.name}{"\n"}{end}' -n default)
    ((${#members[@]} == 2)) && break
    ((SECONDS < deadline)) || { echo "members: ${members[*]}"; kubectl get volumesnapshot -o wide; return 1; }
    sleep 0.2
  done
  for m in "${members[@]}"; do
    i=$((i + 1))
    wait_for "volumesnapshot/$m" '{.status.readyToUse}' true 60 || return 1
    pvc "gr$i" 64Mi "dataSource: {name: $m, kind: VolumeSnapshot, apiGroup: snapshot.storage.k8s.io}" \
      && bound "gr$i" && publish "gr$i" || return 1
    [[ ! -e $work/mnt-gr$i/after ]] || { echo "gr$i holds a file written after the group"; return 1; }
    seen+=("$(cat "$work/mnt-gr$i/who")")
  done
  [[ $(printf '%s\n' "${seen[@]}" | sort | xargs) == "g1 g2" ]] || { echo "restored: ${seen[*]}"; return 1; }
}
check "a VolumeGroupSnapshot of two claims restores each claim as it was at that instant" group

cannot_follow() {
  # A claim of a followPod class, its pod unschedulable while its node w1 is cordoned. This
  # API server keeps PersistentVolume node affinity immutable (MutablePVNodeAffinity off):
  # the leader says so on the claim, and the volume stays where it is.
  storage_class qsd-follow '{followPod: "true"}' && pvc follow 64Mi "" qsd-follow && bound follow || return 1
  local volume; volume=$(handle follow)
  kubectl apply -f - >/dev/null <<EOF || return 1
apiVersion: v1
kind: ServiceAccount
metadata: {name: default, namespace: default}
---
apiVersion: v1
kind: Pod
metadata: {name: follower, namespace: default}
spec:
  automountServiceAccountToken: false
  containers: [{name: c, image: registry.k8s.io/pause}]
  volumes: [{name: v, persistentVolumeClaim: {claimName: follow}}]
EOF
  # What the scheduler reports of a pod it cannot place (no scheduler runs here).
  kubectl patch pod follower --subresource=status --type=merge \
    -p '{"status":{"conditions":[{"type":"PodScheduled","status":"False","reason":"Unschedulable"}]}}' >/dev/null &&
    kubectl cordon w1 >/dev/null || return 1
  local said=0
  wait_until 30 has_event follow VolumeCannotFollow && said=1
  kubectl uncordon w1 >/dev/null && kubectl delete pod follower --wait --timeout=60s >/dev/null || return 1
  ((said)) || { echo "no VolumeCannotFollow event"; return 1; }
  events follow VolumeCannotFollow | has "volume $volume cannot follow pod default/follower off node w1: the API server does not let PersistentVolume .*'s node affinity change (that needs the MutablePVNodeAffinity feature gate)" ||
    { events follow VolumeCannotFollow; return 1; }
  [[ $(handle follow) == "$volume" ]] && field_is "pv/$(field pvc/follow '{.spec.volumeName}')" \
    '{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}' w1 || return 1
  kubectl delete pvc follow --wait --timeout=90s >/dev/null
}
check "a followPod claim's pod unschedulable on cordoned w1, MutablePVNodeAffinity off: a VolumeCannotFollow event says why; the volume stays" cannot_follow

delete_all() {
  # Whatever the checks that ran made: every claim published here, every snapshot, every claim.
  local c
  for c in $(kubectl get pvc -o name -n default); do
    c=${c#*/}
    if findmnt "$work/mnt-$c" >/dev/null; then unpublish "$c" || return 1; fi
  done
  # Groups first: a group's member snapshots are kept for it until the group goes.
  kubectl delete volumegroupsnapshot --all --wait --timeout=90s && \
    kubectl delete volumesnapshot --all --wait --timeout=90s && \
    kubectl delete pvc --all --wait --timeout=90s || return 1
  wait_until 90 bash -c "[[ -z \$('$tools/kubectl' get pv -o name) ]]" || { kubectl get pv; return 1; }
  local left; left=$("$qsd_csi" --endpoint "unix://$work/ctl.sock" volume list | grep '^vol:')
  [[ -z $left ]] || { echo "volumes left: $left"; return 1; }
  wait_until 30 bash -c "[[ -z \$(ls '$work/state/pools/default/layers') ]]" \
    || { ls "$work/state/pools/default/layers"; return 1; }
}
check "deleting claims and snapshot removes the volumes and their layers" delete_all

release() {
  kill -TERM "$ctl2_pid"
  wait_field 30 lease/qsd-csi-controller '{.spec.holderIdentity}' '' -n qsd \
    || { echo "holder $(holder)"; return 1; }
}
check "a controller stopped with SIGTERM releases the Lease at once" release

if ((failed)); then
  for l in ctl-1 ctl-2 node csi-provisioner csi-snapshotter csi-resizer snapshot-controller; do
    echo "--- $l (last lines)"; tail -6 "$work/$l.log"
  done
fi
echo "cluster: $passed passed, $failed failed, 0 skipped"
((failed == 0))
