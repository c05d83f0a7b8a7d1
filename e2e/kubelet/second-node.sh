# shellcheck shell=bash
# A second node, w2, for the kubelet suite (QSD_CSI_KUBELET_NODES=2); sourced by run.sh after
# the first node is up. As kind's node containers are, w2 is a network namespace and a mount
# namespace of its own, on this machine:
#   - network: namespace qsd-<run>, a veth pair 10.89.0.1 (host) / 10.89.0.2 (w2), w2's own pod
#     bridge (10.88.1.0/24) inside; w2 reaches the host's addresses (the API server, w1's node
#     address 10.88.0.1) through the pair, nothing else;
#   - mounts: a namespace where $work/kubelet and $work/state are w2's own directories (bind
#     mounts, shared within w2 only), so the chart's hostPaths name the same paths on both nodes
#     and each node sees its own;
#   - its own containerd (state under $work/w2), kubelet (node w2, cgroup root /qsd-w2), CNI
#     configuration and IPAM store.
# Uses from run.sh: work, tools, versions, images, api_port, start, wait_until, fail_start.
# Sets: w2_ns (the network namespace), w2_ip; defines in_w2 (runs a command in w2's namespaces).

w2_ip=10.89.0.2
w2_ns="qsd-$(basename "$work")"
w2_mnt=$work/w2/mnt.ns

in_w2() { nsenter --net="/run/netns/$w2_ns" --mount="$w2_mnt" -- "$@"; }

start_second_node() {
  local d=$work/w2
  mkdir -p "$d/kubelet" "$d/state" "$d/cni" "$d/containerd" "$d/ipam" "$d/pod-logs" || return 1
  # The network namespace and its link to the host.
  ip netns add "$w2_ns" && ip link add qsdv2h type veth peer name qsdv2n &&
    ip link set qsdv2n netns "$w2_ns" && ip addr add 10.89.0.1/24 dev qsdv2h && ip link set qsdv2h up &&
    ip -n "$w2_ns" addr add "$w2_ip/24" dev qsdv2n && ip -n "$w2_ns" link set qsdv2n up &&
    ip -n "$w2_ns" link set lo up && ip -n "$w2_ns" route add default via 10.89.0.1 ||
    fail_start "w2's network namespace" containerd
  # The mount namespace, kept in a file (whose mount must be private), with w2's directories
  # over the chart's paths, shared within w2 so that Bidirectional mounts reach its pods.
  mount --bind "$d" "$d" && mount --make-private "$d" && touch "$w2_mnt" &&
    unshare --mount="$w2_mnt" --propagation private true ||
    fail_start "w2's mount namespace" containerd
  # Its runtime's state (runc's root is under /run/containerd) a tmpfs of its own.
  mkdir -p /run/containerd
  # (w1's shared bind mounts of those paths came along as private copies: unmounted first, so
  # that the one mount at each path is w2's, shared, as containerd requires.)
  nsenter --mount="$w2_mnt" -- sh -c "
    umount -l '$work/kubelet' && umount -l '$work/state' &&
    mount --bind '$d/kubelet' '$work/kubelet' && mount --make-rshared '$work/kubelet' &&
    mount --bind '$d/state' '$work/state' && mount --make-rshared '$work/state' &&
    mount -t tmpfs -o mode=0711 tmpfs /run/containerd" ||
    fail_start "w2's directories" containerd
  # Its pods' cgroups under a root of its own: a kubelet removes the pod cgroups under its root
  # that are not its pods'. (cgroup v1 here: one hierarchy per controller; cpuset's needs its
  # CPUs and memory nodes before anything joins it.)
  local c
  for c in /sys/fs/cgroup/*/; do
    [[ -e $c/cgroup.procs ]] && mkdir -p "$c/qsd-w2"
  done
  if [[ -e /sys/fs/cgroup/cpuset/cpuset.cpus ]]; then
    cat /sys/fs/cgroup/cpuset/cpuset.cpus >/sys/fs/cgroup/cpuset/qsd-w2/cpuset.cpus &&
      cat /sys/fs/cgroup/cpuset/cpuset.mems >/sys/fs/cgroup/cpuset/qsd-w2/cpuset.mems
  fi
  sed -e "s#$work/containerd/#$d/containerd/#g" -e "s#$work/containerd.sock#$d/containerd.sock#g" \
    -e "s#conf_dir = \"$work/cni\"#conf_dir = \"$d/cni\"#" "$work/containerd.toml" >"$d/containerd.toml"
  cat >"$d/cni/10-qsd.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "qsd-kubelet-w2", "plugins": [
  {"type": "bridge", "bridge": "qsdk0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "dataDir": "$d/ipam", "ranges": [[{"subnet": "10.88.1.0/24"}]], "routes": []}},
  {"type": "loopback"}]}
JSON
  PATH=$tools:$PATH start containerd-w2 in_w2 "$tools/containerd" --config "$d/containerd.toml"
  wait_until 30 test -S "$d/containerd.sock" || fail_start "w2's containerd" containerd-w2
  local image
  for image in "${images[@]}"; do
    "$tools/ctr" --address "$d/containerd.sock" -n k8s.io images import "$image" >/dev/null ||
      fail_start "importing $image on w2" containerd-w2
  done
  sed "s#server: \"https://127.0.0.1:#server: \"https://10.89.0.1:#" "$KUBECONFIG" >"$d/kubeconfig"
  sed -e "s#unix://$work/containerd.sock#unix://$d/containerd.sock#" -e "s#^address: .*#address: $w2_ip#" \
    -e "s#^podLogsDir: .*#podLogsDir: $d/pod-logs#" "$work/kubelet.yaml" >"$d/kubelet.yaml"
  echo "cgroupRoot: /qsd-w2" >>"$d/kubelet.yaml"
  start kubelet-w2 in_w2 "$tools/kubelet" --kubeconfig "$d/kubeconfig" --config "$d/kubelet.yaml" \
    --root-dir "$work/kubelet" --hostname-override w2 --node-ip "$w2_ip"
  wait_field 90 node/w2 '{.status.conditions[?(@.type=="Ready")].status}' True ||
    fail_start "w2's kubelet (node Ready)" kubelet-w2
}

# What w2 leaves besides its processes: its devices, its network namespace and the host's end
# of its link (its mount namespace goes with its last process).
stop_second_node() {
  ip link delete qsdv2h 2>/dev/null
  ip netns delete "$w2_ns" 2>/dev/null
  umount "$work/w2/mnt.ns" 2>/dev/null
  # Its cgroups, deepest first (their processes are gone).
  find /sys/fs/cgroup/*/qsd-w2 -depth -type d -exec rmdir {} \; 2>/dev/null
}
