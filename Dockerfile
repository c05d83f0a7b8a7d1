# The qsd-csi image: the `qsd-csi` binary (node plugin, controller, standalone and CLI),
# `qsd-csi-registrar` (registers the driver with the kubelet), and what they run:
# qemu-storage-daemon (QEMU 7.2, Debian bookworm), mkfs/resize tools, mount, FUSE.
# The Helm chart runs it as the controller, as the node plugin, and as the node's
# qemu-storage-daemon container.
#
#   docker build -t ghcr.io/qsd-csi/qsd-csi:0.1.0 .
FROM rust:1-bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p qsd-csi-controller --bin qsd-csi \
    && install -D target/release/qsd-csi /out/qsd-csi

FROM golang:1-bookworm AS registrar
WORKDIR /src
COPY registrar/ .
RUN CGO_ENABLED=0 go build -o /out/qsd-csi-registrar .

FROM debian:bookworm-slim
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        qemu-system-common qemu-utils e2fsprogs xfsprogs mount util-linux fuse3 kmod ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/qsd-csi /usr/local/bin/qsd-csi
COPY --from=registrar /out/qsd-csi-registrar /usr/local/bin/qsd-csi-registrar
ENTRYPOINT ["/usr/local/bin/qsd-csi"]
