#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run): packages, real runtimes,
# formatting, clippy, then every test of the workspace against the real
# Docker engine and libvirt. Exits non-zero if any step fails.
#
# Setup steps (deps, runtimes) stop the run when they fail. The check steps
# (fmt, clippy, test, helm chart) all run so one CI log shows every problem; the script
# then exits non-zero if any of them failed. PERSYS_TEST_FAIL_FAST=1 stops at
# the first failing check instead.
#
# Every step prints how long it took, and the summary the whole run's time
# against its budget (PERSYS_TEST_BUDGET_SECS, 20 minutes), and says loudly
# when a run goes over it (it does not fail the run: the time includes a
# cold build and package installs, which a slower CI machine may stretch).
#
# A test that cannot run because a runtime is missing fails in CI (CI=true,
# which .ci/run sets). Elsewhere it is skipped and recorded in
# target/test-skips.log (persys-test-support); the summary counts and lists
# the skipped tests, so a skip never passes for a pass. In CI the summary
# also asserts that nothing was skipped.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

step() { printf '\n==== [%s] %s ====\n' "$(date +%H:%M:%S)" "$*"; }
run_start=$SECONDS
budget=${PERSYS_TEST_BUDGET_SECS:-1200}

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
# require the real runtimes instead of skipping); .ci/run sets CI=true.
if [[ -n ${CI+set} ]]; then export CI; fi
in_ci=false
case ${CI-} in [Tt][Rr][Uu][Ee] | 1) in_ci=true ;; esac
# Where the tests record what they skipped (persys-test-support).
export PERSYS_TEST_SKIP_LOG="$root/target/test-skips.log"

setup() {
  local name=$1 start=$SECONDS
  shift
  step "$name"
  "$@"
  printf -- '---- %s: ok (%ds)\n' "$name" $((SECONDS - start))
}

setup "hack/deps.sh (packages)" bash "$root/hack/deps.sh"
setup "hack/runtimes-up.sh (dockerd, libvirtd, test image)" bash "$root/hack/runtimes-up.sh"

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
mkdir -p "$root/target"
: >"$PERSYS_TEST_SKIP_LOG"
check "cargo test" "$CARGO" test --workspace
check "helm chart" bash "$root/hack/chart-check.sh"

step "summary"
skips=$(grep -c '^SKIPPED:' "$PERSYS_TEST_SKIP_LOG" || true)
if ((skips)); then
  printf 'SKIPPED %d test(s) (a runtime was missing; %s):\n' "$skips" "$PERSYS_TEST_SKIP_LOG"
  sed 's/^/  /' "$PERSYS_TEST_SKIP_LOG"
  # Cannot happen unless a test skips without persys-test-support's panic.
  if [[ $in_ci == true ]]; then failed+=("skipped tests in CI"); fi
else
  echo "skipped tests: 0"
fi
total=$((SECONDS - run_start))
printf 'total: %dm%02ds (budget %dm%02ds)\n' $((total / 60)) $((total % 60)) $((budget / 60)) $((budget % 60))
if ((total > budget)); then
  echo "!!! the suite took longer than its budget (PERSYS_TEST_BUDGET_SECS=$budget): look at the step times above"
fi
if ((${#failed[@]})); then
  printf 'FAILED: %s\n' "${failed[*]}"
  exit 1
fi
echo "all checks passed"
