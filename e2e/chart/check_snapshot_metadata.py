"""The rendered snapshot-metadata pieces fit together (values: snapshotMetadata.enabled):
the SnapshotMetadataService names the Service's address and the CA of the certificate the
sidecar serves, for the Service's DNS name; the Service reaches the sidecar's port on the
controller pods; the sidecar talks to the driver's socket. The sidecar itself is not run here
(its module is not on the Go module proxy): this checks the wiring, not the sidecar.
Usage: check_snapshot_metadata.py RENDERED.yaml
"""

import base64
import subprocess
import sys

import yaml


def main():
    docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
    one = lambda kind: next(d for d in docs if d["kind"] == kind and (kind != "Secret" or d["metadata"]["name"].endswith("-snapshot-metadata-tls")))
    sms, secret = one("SnapshotMetadataService"), one("Secret")
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-snapshot-metadata"))
    deployment = one("Deployment")
    assert sms["metadata"]["name"] == "qsd.csi.dev", "named after the driver"
    host, port = sms["spec"]["address"].rsplit(":", 1)
    svc = service["metadata"]
    assert host == f'{svc["name"]}.{svc["namespace"]}', host
    assert int(port) == service["spec"]["ports"][0]["port"], port
    ca = base64.b64decode(sms["spec"]["caCert"])
    assert ca == base64.b64decode(secret["data"]["tls.crt"]), "caCert is the serving certificate"
    names = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"], input=ca,
                           capture_output=True, check=True).stdout.decode()
    assert f"DNS:{host}" in names, names
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items()), "Service selects the controller pods"
    sidecar = next(c for c in pod["spec"]["containers"] if c["name"] == "csi-snapshot-metadata")
    target = service["spec"]["ports"][0]["targetPort"]
    assert any(p["name"] == target for p in sidecar["ports"]), "the Service's target port is the sidecar's"
    assert "--csi-address=/csi/csi.sock" in sidecar["args"], sidecar["args"]
    mounted = {m["name"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    tls = next(v for n, v in volumes.items() if n in mounted and "secret" in v)
    assert tls["secret"]["secretName"] == secret["metadata"]["name"]
    print(f"SnapshotMetadataService -> {sms['spec']['address']}, CA = the sidecar's certificate for {host}")


if __name__ == "__main__":
    main()
