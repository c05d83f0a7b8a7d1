"""Runs the rendered chart's qsd-csi processes locally and drives a volume through them.

Taken from the rendered objects, unchanged except for paths and addresses:
  - the DaemonSet's qemu-storage-daemon container command (external daemon),
  - the DaemonSet's qsd-csi container arguments (node plugin + agent over mutual TLS),
  - the Deployment's qsd-csi container arguments (controller),
  - the certificates in the chart's generated Secret.
Usage: run_rendered.py RENDERED.yaml WORKDIR QSD_CSI_BINARY
"""

import base64
import os
import signal
import socket
import subprocess
import sys
import time

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
    rendered, work, binary = sys.argv[1], sys.argv[2], sys.argv[3]
    docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
    secret = next(d for d in docs if d["kind"] == "Secret")
    tls = os.path.join(work, "tls")
    os.makedirs(tls)
    for key, value in secret["data"].items():
        with open(os.path.join(tls, key), "wb") as f:
            f.write(base64.b64decode(value))

    daemonset = next(d for d in docs if d["kind"] == "DaemonSet")
    state_mount = next(
        m["mountPath"]
        for m in container(docs, "DaemonSet", "qsd-csi")["volumeMounts"]
        if m["name"] == "state-dir"
    )
    state = os.path.join(work, "state")
    shared = os.path.join(work, "shared")
    os.makedirs(shared)
    port = free_port()

    def local(arg, who):
        arg = arg.replace(state_mount, state).replace("/mnt/qsd-shared", shared)
        arg = arg.replace("/etc/qsd-csi/tls/tls.crt", os.path.join(tls, f"{who}.crt"))
        arg = arg.replace("/etc/qsd-csi/tls/tls.key", os.path.join(tls, f"{who}.key"))
        arg = arg.replace("/etc/qsd-csi/tls/ca.crt", os.path.join(tls, "ca.crt"))
        arg = arg.replace("unix:///csi/csi.sock", f"unix://{work}/{who}.sock")
        arg = arg.replace("0.0.0.0:", "127.0.0.1:").replace(":9443", f":{port}")
        return arg.replace("10.0.0.1:", "127.0.0.1:")

    qsd = container(docs, "DaemonSet", "qemu-storage-daemon")
    node = container(docs, "DaemonSet", "qsd-csi")
    ctl = container(docs, "Deployment", "qsd-csi")
    assert daemonset["spec"]["template"]["spec"]["hostNetwork"], "node agents need hostNetwork"
    procs = []
    logs = open(os.path.join(work, "processes.log"), "w")
    env = dict(os.environ, KUBE_NODE_NAME="worker-1")
    try:
        procs.append(subprocess.Popen(qsd["command"] + [local(a, "node") for a in qsd["args"]],
                                      stdout=logs, stderr=logs))
        wait_for(os.path.join(state, "run", "qmp.sock"), procs, "qemu-storage-daemon")
        procs.append(subprocess.Popen([binary] + [local(a, "node") for a in node["args"]],
                                      stdout=logs, stderr=logs, env=env))
        wait_for(os.path.join(work, "node.sock"), procs, "node plugin")
        procs.append(subprocess.Popen([binary] + [local(a, "controller") for a in ctl["args"]],
                                      stdout=logs, stderr=logs))
        wait_for(os.path.join(work, "controller.sock"), procs, "controller")

        def cli(endpoint, *args):
            out = subprocess.run([binary, "--endpoint", f"unix://{work}/{endpoint}.sock", *args],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"qsd-csi {' '.join(args)}: {out.stderr}")
            return out.stdout

        volume = cli("controller", "volume", "create", "pvc-1", "--size", "64M").split("\t")[0]
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
        # The shared pool the rendered arguments give the node plugin.
        volume = cli("controller", "volume", "create", "pvc-2", "--size", "16M",
                     "--pool", "shared").split("\t")[0]
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
