#!/usr/bin/env bash
# Builds the agent's container image, persys/compute-agent:dev (the
# platform's name; PERSYS_IMAGE to change the tag), also tagged with the
# earlier name persys/agent:dev so what refers to it keeps working (not with
# PERSYS_IMAGE), then checks it runs: persys-agent --help, docker-compose,
# qemu-img, genisoimage and tini inside it. Idempotent.
#
# Two ways to build, detected (PERSYS_IMAGE_MODE=auto|dockerfile|offline):
#
#   dockerfile  `docker build` of ./Dockerfile, when its base images
#               (rust:1-bookworm, debian:bookworm-slim) are present locally or
#               can be pulled. Docker's build cache makes reruns cheap.
#
#   offline     when no base image can be had (no registry, as on the
#               development machines): the same image assembled without one.
#               - the release binaries from target/release (CARGO_TARGET_DIR),
#                 built with cargo only when missing (PERSYS_IMAGE_CARGO=auto;
#                 always: run cargo build every time; never: use what is
#                 there, leaving out a missing persysctl);
#               - the Dockerfile's runtime packages (ca-certificates,
#                 docker-compose, qemu-utils, genisoimage, libvirt0, tini)
#                 plus base-files and dash (/bin/sh), with their whole
#                 Depends/Pre-Depends closure, copied file by file from this
#                 host's installed Debian packages (dpkg's file lists; missing
#                 packages are apt-get installed first). Documentation, man
#                 pages and locales are left out;
#               - what dpkg maintainer scripts would have generated: the CA
#                 bundle (/etc/ssl/certs, copied from the host), ld.so.cache
#                 (ldconfig -r), /etc/passwd and /etc/group with the persys
#                 user (uid/gid 10001), nsswitch.conf;
#               - any shared library the binaries need (ldd) that the packages
#                 did not bring;
#               then `docker import` with the Dockerfile's ENTRYPOINT, ENV,
#               USER, WORKDIR and EXPOSE. The image's comment records a hash of
#               its inputs (binaries, package versions, this script): an
#               unchanged image is kept, not rebuilt.
#               What it lacks next to the Dockerfile's image: apt/dpkg
#               metadata (no `apt-get install` inside, no package database),
#               the essential tools of debian:bookworm-slim (coreutils, bash,
#               util-linux...: only dash's /bin/sh), maintainer-script
#               side effects other than those above (alternatives, compiled
#               Python bytecode), and it is built from this host's package
#               versions (Debian 12, same as the Dockerfile's base).
#
# Needs root (docker, apt-get) and a running Docker engine (started with
# hack/runtimes-up.sh when it is not).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

IMAGE=${PERSYS_IMAGE:-persys/compute-agent:dev}
# The earlier name, kept as a second tag of the default image.
OLD_IMAGE=persys/agent:dev
MODE=${PERSYS_IMAGE_MODE:-auto}
CARGO_MODE=${PERSYS_IMAGE_CARGO:-auto}
BASE_IMAGES=(rust:1-bookworm debian:bookworm-slim)
UID_PERSYS=10001
# The Dockerfile's runtime packages, and the base the offline image needs.
RUNTIME_PACKAGES=(ca-certificates docker-compose qemu-utils genisoimage libvirt0 tini)
BASE_PACKAGES=(base-files dash)

log() { printf 'image: %s\n' "$*" >&2; }
die() { printf 'image: ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (docker, apt-get, chroot-free rootfs ownership)"

# The Debian CLI matches the engine's API (see hack/runtimes-up.sh).
if [[ -x /usr/bin/docker ]]; then DOCKER=/usr/bin/docker; else DOCKER=$(command -v docker) || die "no docker CLI"; fi
dk() { "$DOCKER" "$@"; }

if ! timeout 20 "$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1; then
  log "Docker engine not answering; starting the runtimes (hack/runtimes-up.sh)"
  bash "$root/hack/runtimes-up.sh"
fi

# ---------------------------------------------------------------------------
# Which way
# ---------------------------------------------------------------------------
base_images_available() {
  local image
  for image in "${BASE_IMAGES[@]}"; do
    dk image inspect "$image" >/dev/null 2>&1 && continue
    log "pulling $image"
    timeout 300 "$DOCKER" pull -q "$image" >/dev/null 2>&1 || {
      log "cannot pull $image (no registry?)"
      return 1
    }
  done
}

case $MODE in
  auto)
    if base_images_available; then MODE=dockerfile; else MODE=offline; fi
    ;;
  dockerfile)
    base_images_available || die "PERSYS_IMAGE_MODE=dockerfile but the base images cannot be pulled"
    ;;
  offline) ;;
  *) die "PERSYS_IMAGE_MODE must be auto, dockerfile or offline" ;;
esac
log "building $IMAGE ($MODE)"

# ---------------------------------------------------------------------------
# dockerfile
# ---------------------------------------------------------------------------
if [[ $MODE == dockerfile ]]; then
  dk build -t "$IMAGE" "$root"
fi

# ---------------------------------------------------------------------------
# offline
# ---------------------------------------------------------------------------
if [[ $MODE == offline ]]; then
  target=${CARGO_TARGET_DIR:-$root/target}/release

  # Binaries: persys-agent, and persysctl (its own package, ./persysctl).
  bins=(persys-agent persysctl)
  missing=()
  for b in "${bins[@]}"; do [[ -x $target/$b ]] || missing+=("$b"); done
  build=()
  case $CARGO_MODE in
    always) build=("${bins[@]}") ;;
    auto) build=("${missing[@]}") ;;
    never)
      [[ -x $target/persys-agent ]] || die "$target/persys-agent is missing (PERSYS_IMAGE_CARGO=never)"
      if ((${#missing[@]})); then
        log "WARNING: leaving out ${missing[*]} (not built; PERSYS_IMAGE_CARGO=never)"
        bins=(persys-agent)
      fi
      ;;
    *) die "PERSYS_IMAGE_CARGO must be auto, always or never" ;;
  esac
  if ((${#build[@]})); then
    if ! command -v cargo >/dev/null; then
      [[ -x $HOME/.cargo/bin/cargo ]] || die "cargo not found in PATH or ~/.cargo/bin"
      export PATH="$HOME/.cargo/bin:$PATH"
    fi
    args=()
    # Each binary is the package of the same name.
    for b in "${build[@]}"; do args+=(-p "$b"); done
    log "cargo build --release ${args[*]}"
    cargo build --release "${args[@]}"
  fi
  for b in "${bins[@]}"; do
    [[ -x $target/$b ]] || die "$target/$b was not built"
    newer=$(find "$root/src" "$root/api" "$root/controllers" "$root/persysctl" "$root/store" "$root/Cargo.toml" "$root/Cargo.lock" \
      \( -name '*.rs' -o -name '*.proto' -o -name 'Cargo.*' \) -newer "$target/$b" -print -quit 2>/dev/null || true)
    if [[ -n $newer ]]; then
      log "WARNING: $target/$b is older than $newer; PERSYS_IMAGE_CARGO=always rebuilds it"
    fi
  done

  # Packages: install what the host lacks, then the dependency closure.
  missing=()
  for p in "${RUNTIME_PACKAGES[@]}" "${BASE_PACKAGES[@]}"; do
    dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi

  # closure PACKAGE...: the installed packages they need (Pre-Depends and
  # Depends, recursively; the first installed alternative, or an installed
  # provider of a virtual package), one "name=version" a line.
  closure() {
    dpkg-query -W -f='${Package}\t${Version}\t${db:Status-Status}\t${Pre-Depends}, ${Depends}\t${Provides}\n' |
      /usr/bin/python3 -c '
import re, sys
roots = sys.argv[1:]
installed, deps, providers = {}, {}, {}
for line in sys.stdin:
    name, version, status, depends, provides = line.rstrip("\n").split("\t")
    if status != "installed":
        continue
    installed[name] = version
    deps[name] = depends
    for p in provides.split(","):
        p = re.sub(r"\(.*?\)", "", p).strip()
        if p:
            providers.setdefault(p, name)
def pick(group):
    for alt in group.split("|"):
        alt = re.sub(r"\(.*?\)|\[.*?\]|<.*?>", "", alt).strip().split(":")[0]
        if alt in installed:
            return alt
        if alt in providers:
            return providers[alt]
    return None
seen, todo = set(), list(roots)
while todo:
    p = todo.pop()
    if p in seen:
        continue
    if p not in installed:
        sys.exit(f"package {p} is not installed")
    seen.add(p)
    for group in deps[p].split(","):
        if group.strip():
            q = pick(group)
            if q is None:
                sys.exit(f"{p}: no installed package satisfies {group.strip()!r}")
            todo.append(q)
for p in sorted(seen):
    print(f"{p}={installed[p]}")
' "$@"
  }
  packages=$(closure "${RUNTIME_PACKAGES[@]}" "${BASE_PACKAGES[@]}") || die "cannot resolve the packages' dependencies"

  # Inputs: binaries, package versions, this script.
  inputs=$(
    {
      for b in "${bins[@]}"; do sha256sum "$target/$b" | sed "s|  .*|  $b|"; done
      printf '%s\n' "$packages"
      sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1
    } | sha256sum | cut -c1-32
  )
  comment="persys-agent offline image, inputs $inputs (hack/image.sh)"
  if [[ $(dk image inspect --format '{{.Comment}}' "$IMAGE" 2>/dev/null || true) == "$comment" ]]; then
    log "$IMAGE is up to date (inputs $inputs); kept"
  else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    rootfs=$tmp/rootfs
    mkdir -p "$rootfs"
    # Same /usr merge as the host (bin -> usr/bin ...), so that dpkg's paths
    # land where the host has them.
    for d in bin sbin lib lib32 lib64 libx32; do
      if [[ -L /$d ]]; then
        mkdir -p "$rootfs/usr/$d"
        ln -s "$(readlink "/$d")" "$rootfs/$d"
      fi
    done

    # Every file and symlink of the packages (directories come with them).
    n=$(wc -l <<<"$packages")
    log "copying $n packages from the host into the rootfs"
    while IFS='=' read -r p _; do
      dpkg-query -L "$p"
    done <<<"$packages" |
      grep '^/' |
      grep -vE '^/usr/share/(doc|doc-base|man|info|locale|lintian|linda|bug|bash-completion)(/|$)' |
      sort -u |
      while IFS= read -r f; do
        if [[ -L $f || -f $f ]]; then printf '%s\n' "${f#/}"; fi
      done >"$tmp/files"
    tar -C / --no-recursion -cf - -T "$tmp/files" |
      tar -C "$rootfs" --keep-directory-symlink --numeric-owner -xpf -

    # What maintainer scripts would have made.
    mkdir -p "$rootfs/etc/ssl" "$rootfs/etc/ld.so.conf.d"
    cp -a /etc/ssl/certs "$rootfs/etc/ssl/"
    cp -a /etc/ld.so.conf "$rootfs/etc/"
    cp -a /etc/ld.so.conf.d/. "$rootfs/etc/ld.so.conf.d/"
    cat >"$rootfs/etc/passwd" <<EOF
root:x:0:0:root:/root:/bin/sh
persys:x:$UID_PERSYS:$UID_PERSYS:persys-agent:/var/lib/persys:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
EOF
    cat >"$rootfs/etc/group" <<EOF
root:x:0:
persys:x:$UID_PERSYS:
nogroup:x:65534:
EOF
    printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n' \
      >"$rootfs/etc/nsswitch.conf"
    mkdir -p "$rootfs"/{root,tmp,proc,sys,dev,run,var/tmp,etc/persys/certs,var/lib/persys/state}
    chmod 1777 "$rootfs/tmp" "$rootfs/var/tmp"
    chmod 0700 "$rootfs/root"
    chown "$UID_PERSYS:$UID_PERSYS" "$rootfs/var/lib/persys" "$rootfs/var/lib/persys/state"
    chmod 0750 "$rootfs/var/lib/persys" "$rootfs/var/lib/persys/state"

    # The binaries, and any library they need that the packages did not bring.
    mkdir -p "$rootfs/usr/local/bin"
    for b in "${bins[@]}"; do
      install -m 0755 "$target/$b" "$rootfs/usr/local/bin/$b"
      while read -r lib; do
        [[ -e $rootfs$lib ]] && continue
        log "adding $lib (needed by $b, not in the packages)"
        mkdir -p "$rootfs$(dirname "$lib")"
        cp -L "$lib" "$rootfs$lib"
      done < <(LC_ALL=C ldd "$target/$b" | awk '/=> \// { print $3 } /^\s*\/[^ ]+ \(/ { print $1 }')
    done
    ldconfig -r "$rootfs"

    tar --numeric-owner -C "$rootfs" -cf "$tmp/rootfs.tar" .
    dk import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV PERSYS_STATE_PATH=/var/lib/persys/state' \
      --change 'ENV PERSYS_TLS_CERT=/etc/persys/certs/agent.crt' \
      --change 'ENV PERSYS_TLS_KEY=/etc/persys/certs/agent.key' \
      --change 'ENV PERSYS_TLS_CA=/etc/persys/certs/ca.crt' \
      --change 'ENV DOCKER_HOST=unix:///var/run/docker.sock' \
      --change 'ENV COMPOSE_DOCKER_CLI_BUILD=0' \
      --change "USER $UID_PERSYS:$UID_PERSYS" \
      --change 'WORKDIR /var/lib/persys' \
      --change 'EXPOSE 50051 8089' \
      --change 'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/persys-agent"]' \
      --message "$comment" \
      "$tmp/rootfs.tar" "$IMAGE" >/dev/null
    log "imported $IMAGE ($(du -sh "$rootfs" | cut -f1) rootfs, inputs $inputs)"
  fi
fi

# ---------------------------------------------------------------------------
# Smoke test: the entrypoint and the tools run inside the image.
# ---------------------------------------------------------------------------
smoke() {
  local what=$1 out
  shift
  if ! out=$(timeout 60 "$DOCKER" run --rm --network none "$@" 2>&1); then
    printf '%s\n' "$out" >&2
    die "$what does not run in $IMAGE"
  fi
  printf '%s\n' "$out" | head -n 1
}
agent_help=$(smoke "persys-agent --help" "$IMAGE" --help)
[[ $agent_help == *persys-agent* ]] || die "persys-agent --help printed: $agent_help"
compose=$(smoke docker-compose --entrypoint docker-compose "$IMAGE" version --short)
qemu=$(smoke qemu-img --entrypoint qemu-img "$IMAGE" --version)
iso=$(smoke genisoimage --entrypoint genisoimage "$IMAGE" --version)
tini=$(smoke tini --entrypoint tini "$IMAGE" --version)
ctl=absent
if dk run --rm --network none --entrypoint /bin/sh "$IMAGE" -c 'test -x /usr/local/bin/persysctl' >/dev/null 2>&1; then
  ctl=$(smoke persysctl --entrypoint persysctl "$IMAGE" --version)
fi
user=$(dk image inspect --format '{{.Config.User}}' "$IMAGE")
size=$(dk image inspect --format '{{.Size}}' "$IMAGE")

if [[ -z ${PERSYS_IMAGE:-} ]]; then
  dk tag "$IMAGE" "$OLD_IMAGE"
  log "tagged $OLD_IMAGE too (the earlier name)"
fi

printf 'image %s (%s, %d MB, user %s): agent ok; docker-compose %s; %s; %s; %s; persysctl: %s\n' \
  "$IMAGE" "$MODE" $((size / 1000000)) "$user" "$compose" "$qemu" "$iso" "$tini" "$ctl"
