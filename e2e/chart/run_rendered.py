"""Runs the rendered chart's qsd-csi processes locally and drives a volume through them.

Taken from the rendered objects, unchanged except for paths and addresses:
  - the daemon DaemonSet's qemu-storage-daemon container command (external daemon),
  - the node DaemonSet's qsd-csi container arguments (node plugin + agent over mutual TLS),
  - the Deployment's qsd-csi container arguments (controller),
  - the CA and controller certificate in the chart's generated Secret, the CA certificate alone
    in its ConfigMap (what the node mounts).
No API server runs here (e2e/cluster has one), so two things are done by hand: the node's
certificate comes from `qsd-csi certs sign-node` with the chart's CA (in a cluster the node asks
for it with --tls-bootstrap and the controller signs it), and the controller's signer arguments
are left out. A controller presenting the node's certificate is refused.
Usage: run_rendered.py RENDERED.yaml WORKDIR QSD_CSI_BINARY REGISTRAR_BINARY
"""

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import yaml


def container(docs, kind, name):
    for d in docs:
        if d and d["kind"] == kind:
            for c in d["spec"]["template"]["spec"]["containers"]:
                if c["name"] == name:
                    return c
    raise SystemExit(f"no container {name} in a {kind}")


def wait_for(path, procs, what):
    deadline = time.time() + 60
    while not os.path.exists(path):
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"{what}: a process exited early ({p.args[0]})")
        if time.time() > deadline:
            raise SystemExit(f"{what}: {path} never appeared")
        time.sleep(0.05)  # poll interval


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    rendered, work, binary, registrar = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
    secret = next(d for d in docs if d["kind"] == "Secret")
    bundle = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-agent-ca-bundle"))
    tls = os.path.join(work, "tls")
    os.makedirs(tls)
    for key, value in secret["data"].items():
        with open(os.path.join(tls, key), "wb") as f:
            f.write(base64.b64decode(value))
    with open(os.path.join(tls, "bundle.crt"), "w") as f:
        f.write(bundle["data"]["ca.crt"])
    assert set(secret["data"]) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}, secret["data"].keys()
    assert "BEGIN" not in bundle["data"]["ca.crt"].split("CERTIFICATE-----", 1)[1].replace("END CERTIFICATE", ""), "only a certificate in the bundle"
    subprocess.run([binary, "certs", "sign-node", "--node", "worker-1", "--ca-cert", os.path.join(tls, "ca.crt"),
                    "--ca-key", os.path.join(tls, "ca.key"), "--out-dir", tls], check=True, capture_output=True)

    daemonset = next(d for d in docs if d["kind"] == "DaemonSet" and d["metadata"]["name"].endswith("-node"))
    state_mount = next(
        m["mountPath"]
        for m in container(docs, "DaemonSet", "qsd-csi")["volumeMounts"]
        if m["name"] == "state-dir"
    )
    state = os.path.join(work, "state")
    shared = os.path.join(work, "shared")
    os.makedirs(shared)
    port = free_port()
    health_ports = (free_port(), free_port())
    metrics_ports = (free_port(), free_port())

    def local(arg, who):
        arg = arg.replace(state_mount, state).replace("/mnt/qsd-shared", shared)
        arg = arg.replace("/etc/qsd-csi/tls/tls.crt", os.path.join(tls, "tls.crt"))
        arg = arg.replace("/etc/qsd-csi/tls/tls.key", os.path.join(tls, "tls.key"))
        ca = "bundle.crt" if who == "node" else "ca.crt"
        arg = arg.replace("/etc/qsd-csi/tls/ca.crt", os.path.join(tls, ca))
        arg = arg.replace("unix:///csi/csi.sock", f"unix://{work}/{who}.sock")
        arg = arg.replace("=/registration", f"={work}/registration").replace("=/csi/csi.sock", f"={work}/node.sock")
        arg = arg.replace(":9809", f":{health_ports[0]}").replace(":9808", f":{health_ports[1]}")
        arg = arg.replace(":9810", f":{metrics_ports[0]}").replace(":9811", f":{metrics_ports[1]}")
        arg = arg.replace("0.0.0.0:", "127.0.0.1:").replace(":9443", f":{port}")
        return arg.replace("10.0.0.1:", "127.0.0.1:")

    def node_args(args):
        """The node's arguments, its certificate from files instead of --tls-bootstrap."""
        assert "--tls-bootstrap" in args, args
        files = ["--tls-cert", os.path.join(tls, "worker-1.crt"), "--tls-key", os.path.join(tls, "worker-1.key")]
        return [a for a in (local(a, "node") for a in args) if a != "--tls-bootstrap"] + files

    def controller_args(args, cert=None):
        """The controller's arguments without the signer (it needs an API server)."""
        signer = ("--signing-ca-key=", "--signing-ca-cert=", "--node-service-account=", "--node-pod-selector=")
        assert all(any(a.startswith(s) for a in args) for s in signer), args
        out = [local(a, "controller") for a in args if not a.startswith(signer)]
        if cert:
            out = [a.replace(os.path.join(tls, "tls."), os.path.join(tls, cert + ".")) for a in out]
        return out

    qsd = container(docs, "DaemonSet", "qemu-storage-daemon")
    node = container(docs, "DaemonSet", "qsd-csi")
    ctl = container(docs, "Deployment", "qsd-csi")
    assert daemonset["spec"]["template"]["spec"]["hostNetwork"], "node agents need hostNetwork"
    # The node plugin reads the daemon's pid from its pidfile and inspects it (src/qsd/fuse_reads.rs).
    for name in ("-node", "-daemon"):
        ds = next(d for d in docs if d["kind"] == "DaemonSet" and d["metadata"]["name"].endswith(name))
        assert ds["spec"]["template"]["spec"].get("hostPID"), f"{name}: both in the host's PID namespace"
    assert "--pidfile" in " ".join(qsd["args"]), "the daemon writes its pid where the plugin reads it"
    procs = []
    logs = open(os.path.join(work, "processes.log"), "w")
    env = dict(os.environ, KUBE_NODE_NAME="worker-1")
    try:
        procs.append(subprocess.Popen(qsd["command"] + [local(a, "node") for a in qsd["args"]],
                                      stdout=logs, stderr=logs))
        wait_for(os.path.join(state, "run", "qmp.sock"), procs, "qemu-storage-daemon")
        procs.append(subprocess.Popen([binary] + node_args(node["args"]),
                                      stdout=logs, stderr=logs, env=env))
        wait_for(os.path.join(work, "node.sock"), procs, "node plugin")
        # The registrar container offers the driver to the kubelet once the CSI socket is there.
        reg = container(docs, "DaemonSet", "registrar")
        procs.append(subprocess.Popen([registrar] + [local(a, "node") for a in reg["args"]],
                                      stdout=logs, stderr=logs))
        wait_for(os.path.join(work, "registration", "qsd.csi.dev-reg.sock"), procs, "registration socket")
        procs.append(subprocess.Popen([binary] + controller_args(ctl["args"]),
                                      stdout=logs, stderr=logs))
        wait_for(os.path.join(work, "controller.sock"), procs, "controller")
        # Someone holding the node's files poses as the controller: refused.
        # (its own health port: a port already taken is fatal to any qsd-csi mode)
        impostor = [a.replace(f"unix://{work}/controller.sock", f"unix://{work}/impostor.sock")
                    .replace(f":{health_ports[1]}", f":{free_port()}").replace(f":{health_ports[0]}", f":{free_port()}")
                    .replace(f":{metrics_ports[1]}", f":{free_port()}")
                    for a in controller_args(ctl["args"], cert="worker-1")]
        procs.append(subprocess.Popen([binary] + impostor, stdout=logs, stderr=logs))
        wait_for(os.path.join(work, "impostor.sock"), procs, "impostor controller")

        def cli(endpoint, *args):
            out = subprocess.run([binary, "--endpoint", f"unix://{work}/{endpoint}.sock", *args],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"qsd-csi {' '.join(args)}: {out.stderr}")
            return out.stdout

        refused = subprocess.run([binary, "--endpoint", f"unix://{work}/impostor.sock", "volume", "create", "x",
                                  "--size", "16M"], capture_output=True, text=True)
        assert refused.returncode != 0 and ("nreachable" in refused.stderr or "Unavailable" in refused.stderr), refused.stderr
        assert not os.path.exists(os.path.join(state, "pools", "default", "volumes", "x.json"))
        print("a controller with the node's certificate: refused")
        volume = cli("controller", "volume", "create", "pvc-1", "--size", "64M").split()[0]
        assert "@worker-1:" in volume, volume
        mnt, staging = os.path.join(work, "mnt"), os.path.join(work, "staging")
        cli("node", "publish", volume, mnt, "--staging-dir", staging)
        with open(os.path.join(mnt, "hello"), "w") as f:
            f.write("from the chart")
        cli("node", "unpublish", volume, mnt, "--staging-dir", staging)
        listed = cli("controller", "volume", "list")
        assert volume in listed, listed
        cli("controller", "volume", "delete", volume)
        assert volume not in cli("controller", "volume", "list")
        print(f"volume {volume}: created by the controller, written through the node, deleted")
        # Both rendered metrics ports answer: the node's daemon and the controller's calls.
        for who, port_, family in (("node", metrics_ports[0], "qsd_csi_daemon_up 1"),
                                   ("controller", metrics_ports[1], "qsd_csi_grpc_request_duration_seconds_count")):
            text = urllib.request.urlopen(f"http://127.0.0.1:{port_}/metrics", timeout=10).read().decode()
            assert family in text, f"{who} metrics lack {family}"
        print("the node's and the controller's metrics answer on their rendered ports")
        # The shared pool the rendered arguments give the node plugin.
        volume = cli("controller", "volume", "create", "pvc-2", "--size", "16M",
                     "--pool", "shared").split()[0]
        assert volume == "vol:shared:pvc-2", volume
        assert os.path.exists(os.path.join(shared, "volumes", "pvc-2.json"))
        cli("node", "publish", volume, mnt, "--staging-dir", staging)
        assert os.path.exists(os.path.join(shared, "owners", "pvc-2.json")), "owner record"
        cli("node", "unpublish", volume, mnt, "--staging-dir", staging)
        cli("controller", "volume", "delete", volume)
        assert not os.path.exists(os.path.join(shared, "volumes", "pvc-2.json"))
        print(f"volume {volume}: in the shared pool, published, deleted")
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGKILL)
            p.wait()
        logs.close()
        if sys.exc_info()[0] is not None:
            print(open(os.path.join(work, "processes.log")).read()[-3000:])


if __name__ == "__main__":
    main()
