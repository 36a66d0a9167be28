#!/usr/bin/env bash
# Runs the agent on a fresh machine in one command: packages, real runtimes,
# development certificates (./dev/certs), a release build of the agent and of
# persysctl (whose path it prints), then the agent in the foreground with its
# state in ./dev/state. Arguments go to the agent:
#   hack/run.sh [persys-agent args...]
# Override with PERSYS_STATE_PATH, PERSYS_TLS_CERT/KEY/CA (or PERSYS_CERTS_DIR).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

step() { printf '==== %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null; then
  [[ -x $HOME/.cargo/bin/cargo ]] || {
    echo "hack/run.sh: cargo not found in PATH or ~/.cargo/bin" >&2
    exit 1
  }
  export PATH="$HOME/.cargo/bin:$PATH"
fi

step "packages (hack/deps.sh)"
bash "$root/hack/deps.sh"

step "runtimes (hack/runtimes-up.sh)"
bash "$root/hack/runtimes-up.sh"

certs=${PERSYS_CERTS_DIR:-$root/dev/certs}
step "development certificates ($certs)"
bash "$root/hack/dev-certs.sh" "$certs"

step "cargo build --release -p persys-agent -p persysctl"
cargo build --release -p persys-agent -p persysctl

target=${CARGO_TARGET_DIR:-$root/target}
bin=$target/release/persys-agent
ctl=$target/release/persysctl
for b in "$bin" "$ctl"; do
  [[ -x $b ]] || { echo "hack/run.sh: $b was not built" >&2; exit 1; }
done

export PERSYS_STATE_PATH=${PERSYS_STATE_PATH:-$root/dev/state}
export PERSYS_TLS_CERT=${PERSYS_TLS_CERT:-$certs/agent.crt}
export PERSYS_TLS_KEY=${PERSYS_TLS_KEY:-$certs/agent.key}
export PERSYS_TLS_CA=${PERSYS_TLS_CA:-$certs/ca.crt}
export DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}
export RUST_LOG=${RUST_LOG:-info}

# The CLI, for another terminal; it defaults to 127.0.0.1:50051 and the
# certificates in ~/.persys.
cat >&2 <<EOF
==== persysctl: $ctl
     with the development certificates, from another terminal:
       mkdir -p ~/.persys && cp $certs/{ca.crt,client.crt,client.key} ~/.persys/
       $ctl get
EOF

step "exec $bin $* (state: $PERSYS_STATE_PATH)"
exec "$bin" "$@"
