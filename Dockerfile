# persys-agent image: the agent and persysctl on Debian 12 with the tools the
# runtimes need.
#
#   docker build -t persys/compute-agent:dev .
#
# Where no base image can be pulled (no registry), hack/image.sh builds an
# equivalent image offline from the host's Debian packages; it uses this
# Dockerfile whenever the base images are available.

# ---------------------------------------------------------------------------
# Build stage
# ---------------------------------------------------------------------------
FROM rust:1-bookworm AS build

# protoc for the API codegen (tonic-prost-build), libvirt headers and
# pkg-config for the virt crate.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libvirt-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .
RUN cargo build --release --locked -p persys-agent -p persysctl \
 && install -D -m 0755 target/release/persys-agent /out/persys-agent \
 && install -D -m 0755 target/release/persysctl /out/persysctl

# ---------------------------------------------------------------------------
# Runtime stage
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim

# - ca-certificates: TLS to registries (image pulls go through the Docker
#   engine, but the agent and compose also talk TLS).
# - docker-compose: the compose CLI. Debian 12 only has v1 (1.29, Python); it
#   talks to the engine through the Python docker SDK, not the docker CLI, so
#   docker.io (only "Recommends" of docker-compose) is not installed:
#   `apt-cache depends docker-compose`. COMPOSE_DOCKER_CLI_BUILD=0 below keeps
#   `build:` sections on the SDK as well.
# - qemu-utils: qemu-img, to create VM disks.
# - genisoimage: cloud-init seed ISOs.
# - libvirt0: the libvirt client library the virt crate links against (the
#   agent talks to the node's libvirtd through its socket).
# - tini: PID 1. Reaps the agent's children (compose, qemu-img, genisoimage)
#   and forwards SIGTERM to the agent, which then stops gracefully. Without
#   -g: the agent decides how its children stop.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates docker-compose qemu-utils genisoimage libvirt0 tini \
 && rm -rf /var/lib/apt/lists/*

# The image's own user. The DaemonSet (charts/persys-agent) and a plain
# `docker run` on a node run the agent as root, privileged: it drives the
# node's Docker socket and libvirtd (both root-owned by default), writes VM
# disks under /var/lib/libvirt/images and keeps its state on a hostPath. The
# agent itself needs no root: run as `persys` (uid/gid 10001) where the Docker
# socket and the libvirt socket are group-accessible — add the node's docker
# and libvirt group ids as supplementary groups (docker run --group-add;
# podSecurityContext.supplementalGroups) and give 10001 the state and image
# directories.
RUN groupadd --system --gid 10001 persys \
 && useradd --system --uid 10001 --gid persys --home-dir /var/lib/persys \
      --shell /usr/sbin/nologin persys \
 && install -d -o persys -g persys -m 0750 /var/lib/persys /var/lib/persys/state \
 && install -d -m 0755 /etc/persys /etc/persys/certs

COPY --from=build /out/persys-agent /out/persysctl /usr/local/bin/

ENV PERSYS_STATE_PATH=/var/lib/persys/state \
    PERSYS_TLS_CERT=/etc/persys/certs/agent.crt \
    PERSYS_TLS_KEY=/etc/persys/certs/agent.key \
    PERSYS_TLS_CA=/etc/persys/certs/ca.crt \
    DOCKER_HOST=unix:///var/run/docker.sock \
    COMPOSE_DOCKER_CLI_BUILD=0

USER 10001:10001
WORKDIR /var/lib/persys
# gRPC (mutual TLS) and metrics/health (plain HTTP: /metrics, /healthz, /readyz).
EXPOSE 50051 8089
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/persys-agent"]
