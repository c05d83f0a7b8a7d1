# shellcheck shell=bash
# Shared by the suites that run a local control plane (e2e/cluster, e2e/kubelet); sourced.
# The sourcing script sets: top (the checkout), tools (the built control plane), suite (its name
# in messages) and failed_line (its summary line for a run that could not start). It may define
# cleanup_more, run before the work directory goes.
# Provides: work (this run's directory, removed at exit unless QSD_CSI_KEEP_CLUSTER is set), port,
# start, wait_until, fail_start, kubectl, storage_class, and start_control_plane.

work=$(mktemp -d "/tmp/qsd-$suite-XXXX")
pids=()
cleanup() {
  local p m
  # Every process started (a check's subshell may have started one: its pid is in the file),
  # then anything else still naming this run's directory.
  for p in "${pids[@]}" $(cat "$work/pids" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
  pkill -9 -f -- "$work/" 2>/dev/null
  wait 2>/dev/null
  [[ -f $work/state/run/qsd.pid ]] && kill -9 "$(cat "$work/state/run/qsd.pid")" 2>/dev/null
  declare -F cleanup_more >/dev/null && cleanup_more
  for m in $(findmnt -rn -o TARGET | grep "^$work" | sort -r); do umount -l "$m" 2>/dev/null; done
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
fail_start() { # WHAT LOG
  echo "$suite: $1 did not start; its log:" >&2; tail -20 "$work/$2.log" >&2; echo "$failed_line"; exit 1
}
wait_until() { # SECONDS COMMAND...: polls (0.2 s) until COMMAND succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do ((SECONDS < deadline)) || return 1; sleep 0.2; done
}
kubectl() { "$tools/kubectl" "$@"; }
# `grep -q` for the end of a pipeline: reads its whole input, so the writer never gets SIGPIPE
# (which pipefail would count as the pipeline failing: a match reported as a failure).
has() { grep "$@" >/dev/null; }
# The one way the suites read and wait on objects: a JSONPath template over `kubectl get`.
field() { # OBJECT TEMPLATE [kubectl get args...]: prints the template's fields
  kubectl get "$1" -o "jsonpath=$2" "${@:3}"
}
field_is() { # OBJECT TEMPLATE VALUE [kubectl get args...]: whether the fields read VALUE
  [[ $(field "$1" "$2" "${@:4}") == "$3" ]]
}
wait_field() { # SECONDS OBJECT TEMPLATE VALUE [kubectl get args...]: until the fields read VALUE
  wait_until "$1" field_is "${@:2}"
}
wait_for() { # OBJECT TEMPLATE VALUE SECONDS [kubectl wait args...]: kubectl wait for a field
  kubectl wait --for="jsonpath=$2=$3" "$1" --timeout="$4s" "${@:5}"
}

# This run's cluster CA ($work/pki/ca.crt, what pods find in kube-root-ca.crt), the API server's
# serving certificate (127.0.0.1 and the kubernetes Service's names) and its client certificate
# for the kubelets (exec, logs).
make_pki() {
  local d=$work/pki
  mkdir -p "$d" || return 1
  key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
  key "$d/ca.key" && openssl req -x509 -new -key "$d/ca.key" -subj "/CN=qsd-$suite-ca" -days 2 \
    -out "$d/ca.crt" 2>/dev/null || return 1
  issue() { # NAME SUBJECT EXTENSIONS
    key "$d/$1.key" && openssl req -new -key "$d/$1.key" -subj "$2" -out "$d/$1.csr" 2>/dev/null &&
      openssl x509 -req -in "$d/$1.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 2 \
        -extfile <(printf '%s\n' "$3" 'basicConstraints=CA:FALSE') -out "$d/$1.crt" 2>/dev/null
  }
  issue apiserver /CN=kube-apiserver "$(printf '%s\n' \
    'subjectAltName=IP:127.0.0.1,IP:10.96.0.1,IP:10.88.0.1,IP:10.89.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc' \
    'extendedKeyUsage=serverAuth')" &&
    issue kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" 'extendedKeyUsage=clientAuth'
}

# etcd, kube-apiserver (admin token in $work/kubeconfig, exported as KUBECONFIG),
# kube-controller-manager with CONTROLLERS (comma-separated), the snapshot CRDs and
# snapshot-controller. Sets api_port. The API server listens on 127.0.0.1, or where api_bind
# says (the kubelet suite's second node reaches it at the host's end of its link).
start_control_plane() { # CONTROLLERS
  local etcd_port peer_port token
  etcd_port=$(port) peer_port=$(port) api_port=$(port)
  start etcd "$tools/etcd" --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" --initial-cluster "default=http://127.0.0.1:$peer_port"
  openssl genrsa -out "$work/sa.key" 2048 2>/dev/null
  make_pki || fail_start "the cluster's certificates" kube-apiserver
  token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  echo "$token,admin,admin,system:masters" >"$work/tokens.csv"
  start kube-apiserver "$tools/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address "${api_bind:-127.0.0.1}" --secure-port "$api_port" --cert-dir "$work/apiserver" \
    --token-auth-file "$work/tokens.csv" --authorization-mode RBAC \
    --service-account-key-file "$work/sa.key" --service-account-signing-key-file "$work/sa.key" \
    --service-account-issuer https://kubernetes.default.svc --service-cluster-ip-range 10.96.0.0/24 \
    --tls-cert-file "$work/pki/apiserver.crt" --tls-private-key-file "$work/pki/apiserver.key" \
    --client-ca-file "$work/pki/ca.crt" --kubelet-client-certificate "$work/pki/kubelet-client.crt" \
    --kubelet-client-key "$work/pki/kubelet-client.key" --kubelet-preferred-address-types InternalIP \
    --allow-privileged ${api_gates:+--feature-gates "$api_gates"}
  cat >"$work/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$work/pki/ca.crt"}}]
users: [{name: admin, user: {token: "$token"}}]
contexts: [{name: local, context: {cluster: local, user: admin}}]
current-context: local
KC
  export KUBECONFIG=$work/kubeconfig
  admin_token=$token
  wait_until 120 kubectl get --raw /readyz || fail_start kube-apiserver kube-apiserver
  start kube-controller-manager "$tools/kube-controller-manager" --kubeconfig "$KUBECONFIG" \
    --leader-elect=false --secure-port=0 --controllers="$1" --root-ca-file "$work/pki/ca.crt" \
    --service-account-private-key-file "$work/sa.key"
  kubectl apply -f "$tools/snapshot-crds" >/dev/null
  wait_until 60 kubectl get volumesnapshotclasses || fail_start "the snapshot CRDs" kube-apiserver
  wait_until 60 kubectl get volumegroupsnapshotclasses || fail_start "the group snapshot CRDs" kube-apiserver
  # Group snapshots are behind a feature gate in snapshot-controller and csi-snapshotter.
  start snapshot-controller "$tools/snapshot-controller" --kubeconfig "$KUBECONFIG" --leader-election=false \
    --feature-gates=CSIVolumeGroupSnapshot=true
}

# The chart's objects rendered (helm template, namespace qsd) into $work/chart.yaml, its
# generated certificates written into $work/tls (Secret keys, and the CA bundle as bundle.crt).
render_chart() {
  "$helm" template qsd "$top/charts/qsd-csi" --namespace qsd --kube-version "${k8s#v}" >"$work/chart.yaml" || return 1
  /usr/bin/python3 - "$work" <<'PY'
import base64, os, sys, yaml
work = sys.argv[1]
docs = [d for d in yaml.safe_load_all(open(f"{work}/chart.yaml")) if d]
os.makedirs(f"{work}/tls")
for k, v in next(d for d in docs if d["kind"] == "Secret")["data"].items():
    open(f"{work}/tls/{k}", "wb").write(base64.b64decode(v))
bundle = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-agent-ca-bundle"))
open(f"{work}/tls/bundle.crt", "w").write(bundle["data"]["ca.crt"])
PY
}

# The rendered chart's cluster objects applied: all but its workloads (Deployment, DaemonSet),
# which these suites run as local processes.
apply_chart_objects() {
  /usr/bin/python3 - "$work" <<'PY' || return 1
import sys, yaml
work = sys.argv[1]
docs = [d for d in yaml.safe_load_all(open(f"{work}/chart.yaml")) if d]
keep = [d for d in docs if d["kind"] not in ("Deployment", "DaemonSet")]
yaml.safe_dump_all(keep, open(f"{work}/cluster-objects.yaml", "w"))
PY
  kubectl apply -f "$work/cluster-objects.yaml" >/dev/null
}

# csi-provisioner (topology, claim metadata), csi-snapshotter and csi-resizer on the controller
# socket SOCKET, with KUBECONFIG's credentials.
start_sidecars() { # KUBECONFIG SOCKET
  local s name extra
  for s in provisioner:"--feature-gates=Topology=true --extra-create-metadata" snapshotter:"--extra-create-metadata --feature-gates=CSIVolumeGroupSnapshot=true" resizer:""; do
    name=${s%%:*} extra=${s#*:}
    # shellcheck disable=SC2086
    start "csi-$name" "$tools/csi-$name" --kubeconfig "$1" --csi-address "$2" \
      --leader-election=false $extra
  done
}

# A WaitForFirstConsumer, expandable StorageClass of the driver with PARAMETERS (a YAML flow map).
storage_class() { # NAME PARAMETERS
  kubectl apply -f - >/dev/null <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: $1}
provisioner: qsd.csi.dev
volumeBindingMode: WaitForFirstConsumer
allowVolumeExpansion: true
parameters: $2
YAML
}

# Runs a check: "SUITE: ok NAME", or "SUITE: FAIL NAME" and the end of its output. Counts both.
# QSD_CSI_CHECKS (a regular expression over the checks' functions) runs only those: each check
# makes what it starts from.
passed=0 failed=0
check() { # NAME COMMAND...
  local name=$1 out; shift
  [[ -z ${QSD_CSI_CHECKS:-} || $1 =~ $QSD_CSI_CHECKS ]] || return 0
  if out=$("$@" 2>&1); then passed=$((passed + 1)); echo "$suite: ok $name"
  else failed=$((failed + 1)); echo "$suite: FAIL $name"; echo "$out" | tail -15 | sed 's/^/  /'; fi
}
