# The qsd-csi image: `qsd-csi` (node plugin, controller, standalone and CLI),
# `qsd-csi-registrar` (registers the driver with the kubelet), and what they run:
# qemu-storage-daemon (the newest QEMU, from Debian trixie-backports), mkfs and resize tools,
# mount, losetup, FUSE. The Helm chart runs it as the controller, the node plugin and the
# node's qemu-storage-daemon.
#
# The binaries are built on the host first, into the build context's bin/ (as the Kubernetes
# CSI sidecars' images are). scripts/build-image does all of it: cargo and go, a build context
# in target/image, then buildah (or docker, if you prefer):
#   scripts/build-image                      # → target/tools/images/qsd-csi-*.tar (OCI archive)
#   docker build -t ghcr.io/qsd-csi/qsd-csi:0.1.0 target/image -f Dockerfile
#
# BASE is any Debian trixie root. scripts/build-image makes one with mmdebstrap that already
# holds PACKAGES (so no network is needed here); on a stock debian:trixie-slim the RUN below
# installs them.
ARG BASE=docker.io/library/debian:trixie-slim
FROM ${BASE}
ARG PACKAGES="qemu-system-common qemu-utils e2fsprogs xfsprogs mount util-linux fuse3 kmod ca-certificates"
RUN set -eu; missing=""; \
    for p in $PACKAGES; do \
      dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q ' installed$' || missing="$missing $p"; \
    done; \
    if [ -n "$missing" ]; then \
      printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: trixie-backports' \
        'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
        >/etc/apt/sources.list.d/trixie-backports.sources; \
      apt-get update -qq; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t trixie-backports $missing; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    qemu-storage-daemon --version | head -1
COPY bin/ /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/qsd-csi"]
