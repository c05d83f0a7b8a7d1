"""Least privilege in the rendered chart (docs/security.md): no key reaches a node.

  - the node DaemonSets' pods (plugin and daemon) reference no Secret at all (a kubelet can read every Secret its
    pods reference): they trust the CA through a ConfigMap holding one certificate;
  - the CA key and the controller's key are in a Secret only the controller Deployment mounts;
  - the node's service account may create and read CertificateSigningRequests, nothing else;
  - the controller may approve and sign for its own signer name only.
Usage: check_privilege.py RENDERED.yaml
"""

import sys

import yaml


def secrets_of(pod_spec):
    names = set()
    for v in pod_spec.get("volumes", []):
        if "secret" in v:
            names.add(v["secret"]["secretName"])
        for source in v.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    for c in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        for e in c.get("envFrom", []):
            if "secretRef" in e:
                names.add(e["secretRef"]["name"])
    return names


def main():
    docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
    kind = lambda k: [d for d in docs if d["kind"] == k]
    daemonsets = {d["metadata"]["name"].rsplit("-", 1)[1]: d["spec"]["template"]["spec"] for d in kind("DaemonSet")}
    node, daemon = daemonsets["node"], daemonsets["daemon"]
    # The daemon (qemu-storage-daemon) needs no API access at all.
    assert not secrets_of(daemon), f"the daemon pods reference Secrets: {secrets_of(daemon)}"
    assert daemon.get("automountServiceAccountToken") is False, "the daemon pods get no token"
    controller = kind("Deployment")[0]["spec"]["template"]["spec"]
    assert not secrets_of(node), f"the node pods reference Secrets: {secrets_of(node)}"
    ca_secret = next(n for n in secrets_of(controller) if n.endswith("-agent-ca"))
    print(f"node pods reference no Secret; {ca_secret} is mounted by the controller only")
    bundle = next(d for d in kind("ConfigMap") if d["metadata"]["name"].endswith("-agent-ca-bundle"))
    text = bundle["data"]["ca.crt"]
    assert text.count("BEGIN CERTIFICATE") == 1 and "PRIVATE" not in text, "the bundle holds one certificate"
    images = {c["image"] for c in node["containers"]}
    assert len(images) == 1 and "qsd-csi" in images.pop(), "the node pod runs the qsd-csi image only"
    node_args = next(c for c in node["containers"] if c["name"] == "qsd-csi")["args"]
    assert "--tls-bootstrap" in node_args and not any(a.startswith("--tls-key") for a in node_args), node_args
    roles = {d["metadata"]["name"]: d for d in kind("ClusterRole")}
    node_role = next(r for n, r in roles.items() if n.endswith("-node"))
    assert node_role["rules"] == [{
        "apiGroups": ["certificates.k8s.io"],
        "resources": ["certificatesigningrequests"],
        "verbs": ["create", "get"],
    }], node_role["rules"]
    ctl_role = next(r for n, r in roles.items() if n.endswith("-controller"))
    signers = [r for r in ctl_role["rules"] if "signers" in r["resources"]]
    assert signers == [{
        "apiGroups": ["certificates.k8s.io"],
        "resources": ["signers"],
        "resourceNames": ["qsd.csi.dev/node-agent"],
        "verbs": ["approve", "sign"],
    }], signers
    print("node: CSR create/get only; controller: approve and sign for qsd.csi.dev/node-agent only")


if __name__ == "__main__":
    main()
