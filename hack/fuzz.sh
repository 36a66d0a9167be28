#!/usr/bin/env bash
# Runs every property-test target of the workspace with a large budget:
# FUZZ_CASES (default 1,000,000) cases for each property, and prints the
# cases, the time and the result of each target. `cargo test` runs the same
# properties with proptest's default budget (256 cases) in CI.
#
#   bash hack/fuzz.sh                 # every target, 1,000,000 cases each
#   bash hack/fuzz.sh queue watch     # only these targets
#   FUZZ_CASES=100000 bash hack/fuzz.sh
#   FUZZ_CASES_watch=200000 bash hack/fuzz.sh   # one target's own budget
#   FUZZ_RELEASE=1 bash hack/fuzz.sh  # optimised build (target/release:
#                                     # a second full build, several GB)
#
# A target is a module of property tests in the crate that owns the code.
# A failing case is shrunk and printed by proptest, and saved under the
# crate's proptest-regressions/ so that `cargo test` replays it first. Any
# failure makes the script exit non-zero (it runs every target first).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# name | cargo test selection | crate directory | test-name filter | what it covers
targets=(
  "validation|-p persys-agent --lib|.|server::validate::proptests|apply validation (container, compose, VM), protobuf round trip"
  "manifest|-p persysctl --bin persysctl|persysctl|manifest::proptests|persysctl manifest parser: round trip, edited manifests"
  "yaml|-p persys-api --lib|api|yaml::proptests|bounded YAML check against the parser"
  "compose-policy|-p persys-controllers --lib|controllers|compose::policy::proptests|compose policy: verdicts, edited files"
  "vm-xml|-p persys-controllers --lib|controllers|vm::domain_xml::proptests|VM domain XML writer/reader round trip, reader on edited/random XML"
  "env|-p persys-controllers --lib|controllers|compose::project::proptests::env_values|.env quoting round trip"
  "store-records|-p persys-store --lib|store|schema::proptests|store record/object/event decoding of random and edited bytes"
  "queue|-p persys-controllers --lib|controllers|queue::proptests|work queue against a model"
  "watch|-p persys-store --lib|store|watch::proptests|store watch against a model of the change log"
)

profile=()
mode=debug
if [[ ${FUZZ_RELEASE:-} == 1 ]]; then
  profile=(--release)
  mode=release
fi
default_cases=${FUZZ_CASES:-1000000}

selected=("$@")
wanted() {
  [[ ${#selected[@]} -eq 0 ]] && return 0
  local name
  for name in "${selected[@]}"; do [[ $name == "$1" ]] && return 0; done
  return 1
}

summary=()
failed=0
started=$SECONDS
printf 'hack/fuzz.sh: %s, %s build, %s cases per property unless set per target\n' \
  "$(date -u '+%Y-%m-%d %H:%M UTC')" "$mode" "$default_cases"
for target in "${targets[@]}"; do
  IFS='|' read -r name selection dir filter what <<<"$target"
  wanted "$name" || continue
  knob="FUZZ_CASES_${name//-/_}"
  cases=${!knob:-$default_cases}
  # Build, then run the test binary itself: cargo would hold the build
  # directory's lock for the whole run.
  # shellcheck disable=SC2086 # the selection is words
  binary=$(cargo test "${profile[@]}" $selection --no-run --message-format=json |
    grep -o '"executable":"[^"]*"' | tail -1 | sed 's/^"executable":"//; s/"$//')
  if [[ -z $binary ]]; then
    echo "hack/fuzz.sh: no test binary for $selection" >&2
    exit 1
  fi
  printf '\n==== %s: %s (%s cases per property)\n' "$name" "$what" "$cases"
  t0=$(date +%s.%N)
  log=$(mktemp)
  # From the crate's directory, as cargo runs it (proptest-regressions/).
  if (cd "$dir" && RUST_BACKTRACE=0 PROPTEST_CASES=$cases "$binary" --quiet "$filter") 2>&1 | tee "$log"; then
    result=ok
  else
    result=FAILED
    failed=1
  fi
  properties=$(grep -Eo '[0-9]+ passed' "$log" | tail -1 | grep -Eo '[0-9]+' || echo 0)
  rm -f "$log"
  seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
  line=$(printf '%-15s %9s cases x %s properties  %8.1f s  %s' "$name" "$cases" "$properties" "$seconds" "$result")
  echo "---- $line"
  summary+=("$line")
done

printf '\n==== summary (%d s in all)\n' $((SECONDS - started))
printf '%s\n' "${summary[@]}"
exit $failed
