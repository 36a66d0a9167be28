#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run): packages, real runtimes,
# formatting, clippy, then every test of the workspace against the real
# Docker engine and libvirt. Exits non-zero if any step fails.
#
# Setup steps (deps, runtimes) stop the run when they fail. The check steps
# (fmt, clippy, test, helm chart) all run so one CI log shows every problem; the script
# then exits non-zero if any of them failed. PERSYS_TEST_FAIL_FAST=1 stops at
# the first failing check instead.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

step() { printf '\n==== [%s] %s ====\n' "$(date +%H:%M:%S)" "$*"; }

# cargo from PATH, else rustup's default location. Put its directory on PATH
# so that rustfmt and clippy-driver resolve to the same toolchain.
if ! command -v cargo >/dev/null; then
  [[ -x $HOME/.cargo/bin/cargo ]] || {
    echo "hack/test.sh: cargo not found in PATH or ~/.cargo/bin" >&2
    exit 1
  }
  export PATH="$HOME/.cargo/bin:$PATH"
fi
CARGO=$(command -v cargo)

export RUST_BACKTRACE=1
export PERSYS_TEST_IMAGE=persys-test/busybox:latest
export DOCKER_HOST=unix:///var/run/docker.sock
# CI is passed through untouched when the caller sets it (tests use it to
# require the real runtimes instead of skipping).
if [[ -n ${CI+set} ]]; then export CI; fi

step "hack/deps.sh (packages)"
bash "$root/hack/deps.sh"

step "hack/runtimes-up.sh (dockerd, libvirtd, test image)"
bash "$root/hack/runtimes-up.sh"

printf '\ncargo: %s (%s)\nCI=%s RUST_BACKTRACE=%s PERSYS_TEST_IMAGE=%s DOCKER_HOST=%s\n' \
  "$CARGO" "$("$CARGO" --version)" "${CI-<unset>}" "$RUST_BACKTRACE" \
  "$PERSYS_TEST_IMAGE" "$DOCKER_HOST"

failed=()
check() {
  local name=$1
  shift
  step "$name"
  local start=$SECONDS rc=0
  "$@" || rc=$?
  if ((rc == 0)); then
    printf -- '---- %s: ok (%ds)\n' "$name" $((SECONDS - start))
  else
    printf -- '---- %s: FAILED with exit code %d (%ds)\n' "$name" "$rc" $((SECONDS - start))
    failed+=("$name")
    if [[ ${PERSYS_TEST_FAIL_FAST:-0} == 1 ]]; then
      exit "$rc"
    fi
  fi
}

check "cargo fmt --check" "$CARGO" fmt --all -- --check
check "cargo clippy" "$CARGO" clippy --workspace --all-targets -- -D warnings
check "cargo doc" env RUSTDOCFLAGS="-D warnings" "$CARGO" doc --workspace --no-deps
check "cargo test" "$CARGO" test --workspace
check "helm chart" bash "$root/hack/chart-check.sh"

step "summary"
if ((${#failed[@]})); then
  printf 'FAILED: %s\n' "${failed[*]}"
  exit 1
fi
echo "all checks passed"
