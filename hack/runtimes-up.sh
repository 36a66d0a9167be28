#!/usr/bin/env bash
# Brings up the runtimes the tests and a dev run need, reusing what already
# runs: the Docker engine, libvirt (virtlogd + libvirtd, qemu:///system) and the
# offline test image persys-test/busybox:latest. Idempotent; a second run on a
# machine where everything is up only checks and prints the summary.
#
# Daemons are started fully detached (own session, stdin from /dev/null, output
# to a log file, no inherited descriptors), so they outlive this script and
# never keep a caller's pipe open (CI captures output).
#
# Needs root. See /work/shared/RUNTIMES.md for why each step is there.
set -euo pipefail

TEST_IMAGE=${PERSYS_TEST_IMAGE:-persys-test/busybox:latest}
DOCKERD_LOG=${PERSYS_DOCKERD_LOG:-/var/log/persys-dockerd.log}
LIBVIRTD_LOG=${PERSYS_LIBVIRTD_LOG:-/var/log/persys-libvirtd.log}
VIRTLOGD_LOG=${PERSYS_VIRTLOGD_LOG:-/var/log/persys-virtlogd.log}
DEADLINE=${PERSYS_RUNTIME_DEADLINE:-60}   # seconds per daemon (libvirtd probes qemu on its first start)
LIBVIRT_URI=qemu:///system
QEMU_CONF=/etc/libvirt/qemu.conf

# We start the engine on the default socket, so talk to that socket.
export DOCKER_HOST=unix:///var/run/docker.sock

log() { printf 'runtimes-up: %s\n' "$*" >&2; }
die() { printf 'runtimes-up: ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (starts dockerd and libvirtd)"

# The Debian CLI (20.10) speaks the engine's API 1.41 natively.
# /usr/local/bin/docker is a newer CLI; it negotiates the API version down, but
# prefer the matching one.
if [[ -x /usr/bin/docker ]]; then
  DOCKER=/usr/bin/docker
elif DOCKER=$(command -v docker); then
  :
else
  die "no docker CLI found (run hack/deps.sh)"
fi

dk() { timeout 20 "$DOCKER" "$@"; }

# detach LOGFILE CMD... — start CMD in its own session, detached from the
# caller: stdin /dev/null, stdout+stderr appended to LOGFILE, all descriptors
# above 2 closed, SIGHUP ignored. Returns immediately.
detach() {
  local logfile=$1
  shift
  mkdir -p "$(dirname "$logfile")"
  printf '\n==== %s: starting %s\n' "$(date -Is)" "$*" >>"$logfile"
  (
    for fd in /proc/"$BASHPID"/fd/*; do
      fd=${fd##*/}
      if [[ $fd =~ ^[0-9]+$ ]] && ((fd > 2)); then
        eval "exec ${fd}>&-" 2>/dev/null || true
      fi
    done
    exec setsid -f nohup "$@" </dev/null >>"$logfile" 2>&1
  )
}

# wait_for NAME LOGFILE CMD... — poll CMD until it succeeds or DEADLINE passes;
# on timeout print the log tail and fail.
wait_for() {
  local name=$1 logfile=$2
  shift 2
  local end=$((SECONDS + DEADLINE))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= end)); then
      log "$name not ready after ${DEADLINE}s; last lines of $logfile:"
      tail -n 40 "$logfile" >&2 || true
      die "$name did not come up"
    fi
    sleep 0.2
  done
}

# live_pid PID NAME — PID is a live (not zombie) process called NAME. A killed
# daemon re-parented to a PID 1 that reaps slowly lingers as a zombie.
live_pid() {
  local pid=$1 name=$2 stat
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  stat=$(cat /proc/"$pid"/stat 2>/dev/null) || return 1
  [[ $stat == "$pid ($name) "* ]] || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}

# running NAME — some live process is called NAME.
running() {
  local pid
  for pid in $(pgrep -x "$1"); do
    live_pid "$pid" "$1" && return 0
  done
  return 1
}

# pid_alive PIDFILE NAME — the pid file names a live process called NAME.
pid_alive() {
  local pidfile=$1 name=$2
  [[ -s $pidfile ]] || return 1
  live_pid "$(<"$pidfile")" "$name"
}

# ---------------------------------------------------------------------------
# Docker engine
# ---------------------------------------------------------------------------
docker_ok() { dk version --format '{{.Server.Version}}' >/dev/null 2>&1; }

docker_state=reused
if ! docker_ok; then
  if running dockerd; then
    # Running but not answering yet (just started by someone else): wait.
    log "dockerd is running but not ready yet; waiting"
    docker_state=waited
  else
    # A dockerd killed with SIGKILL leaves its pid file; a recycled pid would
    # make the new daemon refuse to start.
    if [[ -e /var/run/docker.pid ]] && ! pid_alive /var/run/docker.pid dockerd; then
      rm -f /var/run/docker.pid
    fi
    log "starting dockerd (log: $DOCKERD_LOG)"
    detach "$DOCKERD_LOG" dockerd --storage-driver=overlay2
    docker_state=started
  fi
  wait_for dockerd "$DOCKERD_LOG" docker_ok
fi
docker_version=$(dk version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')

# ---------------------------------------------------------------------------
# libvirt
# ---------------------------------------------------------------------------
# 1. The qemu driver wants its user and group to exist, even when it runs
#    domains as root.
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
  useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu

# 2. qemu.conf: run domains as root, no chown of images, no virtlogd pipes.
#    set_conf KEY VALUE: replace an existing uncommented KEY line, else append.
#    Touches the file only when something changes.
qemu_conf_changed=0
set_conf() {
  local key=$1 value=$2
  if grep -qE "^[[:space:]]*${key}[[:space:]]*=[[:space:]]*${value}[[:space:]]*$" "$QEMU_CONF"; then
    return 0
  fi
  if grep -qE "^[[:space:]]*${key}[[:space:]]*=" "$QEMU_CONF"; then
    sed -i -E "s|^[[:space:]]*${key}[[:space:]]*=.*$|${key} = ${value}|" "$QEMU_CONF"
  else
    printf '%s = %s\n' "$key" "$value" >>"$QEMU_CONF"
  fi
  qemu_conf_changed=1
}
mkdir -p /etc/libvirt
if [[ ! -e $QEMU_CONF ]]; then
  printf '# persys-agent dev/test settings (hack/runtimes-up.sh)\n' >"$QEMU_CONF"
fi
set_conf user '"root"'
set_conf group '"root"'
set_conf dynamic_ownership 0
set_conf stdio_handler '"file"'

# 3. Directories, then virtlogd, then libvirtd.
mkdir -p /var/log/libvirt /var/lib/libvirt/images /var/lib/libvirt/qemu /var/run/libvirt

libvirt_ok() { timeout 10 virsh -c "$LIBVIRT_URI" version >/dev/null 2>&1; }

if ((qemu_conf_changed)) && running libvirtd; then
  # A libvirtd started before the fix runs with the wrong settings.
  log "$QEMU_CONF changed; restarting libvirtd"
  for pid in $(pgrep -x libvirtd); do kill "$pid" 2>/dev/null || true; done
  end=$((SECONDS + DEADLINE))
  while running libvirtd; do
    ((SECONDS < end)) || die "libvirtd did not stop"
    sleep 0.2
  done
fi

libvirt_state=reused
if ! running virtlogd; then
  # Sockets left by a killed virtlogd would pass the readiness check early.
  rm -f /var/run/libvirt/virtlogd-sock /var/run/libvirt/virtlogd-admin-sock
  log "starting virtlogd (log: $VIRTLOGD_LOG)"
  detach "$VIRTLOGD_LOG" virtlogd
  libvirt_state=started
  wait_for virtlogd "$VIRTLOGD_LOG" test -S /var/run/libvirt/virtlogd-sock
fi
if ! libvirt_ok; then
  if running libvirtd; then
    log "libvirtd is running but not ready yet; waiting"
    [[ $libvirt_state == started ]] || libvirt_state=waited
  else
    log "starting libvirtd (log: $LIBVIRTD_LOG)"
    detach "$LIBVIRTD_LOG" libvirtd
    libvirt_state=started
  fi
  wait_for libvirtd "$LIBVIRTD_LOG" libvirt_ok
fi
libvirt_version=$(timeout 10 virsh -c "$LIBVIRT_URI" version 2>/dev/null |
  sed -n 's/^Running hypervisor: //p; s/^Using library: libvirt /libvirt /p' | paste -sd, -)

# ---------------------------------------------------------------------------
# Offline test image (no registry here): busybox-static in a scratch rootfs.
# ---------------------------------------------------------------------------
image_state=reused
if ! dk image inspect "$TEST_IMAGE" >/dev/null 2>&1; then
  busybox=
  for b in /bin/busybox /usr/bin/busybox; do
    [[ -x $b ]] || continue
    # ldd exits 1 on a static binary; only its message matters.
    ldd_out=$(LC_ALL=C ldd "$b" 2>&1 || true)
    if [[ $ldd_out == *"not a dynamic executable"* || $ldd_out == *"statically linked"* ]]; then
      busybox=$b
      break
    fi
  done
  [[ -n $busybox ]] || die "no static busybox found (install busybox-static: hack/deps.sh)"

  log "building $TEST_IMAGE from $busybox"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  root=$tmp/rootfs
  mkdir -p "$root"/{bin,etc,root,tmp,proc,sys,dev,var/www}
  chmod 1777 "$root/tmp"
  chmod 0700 "$root/root"
  install -m 0755 "$busybox" "$root/bin/busybox"
  available=" $("$busybox" --list | tr '\n' ' ') "
  applets=(
    sh ash sleep httpd nc cat echo ls env true false kill wget mkdir rmdir rm
    id touch printf grep head tail seq date test '[' sed awk wc cut tr sort uniq
    cp mv ln chmod chown pwd printenv hostname uname ps pidof sync tee timeout
    expr basename dirname stat readlink realpath find xargs which whoami
    usleep yes du df free uptime nslookup ping ip ifconfig netstat mktemp
    sha256sum md5sum base64 od hexdump gzip gunzip tar vi less more dd
  )
  for a in "${applets[@]}"; do
    if [[ $available == *" $a "* ]]; then
      ln -s busybox "$root/bin/$a"
    fi
  done
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
nobody:x:65534:
EOF
  tar --numeric-owner --owner=0 --group=0 -C "$root" -cf "$tmp/rootfs.tar" .
  dk import \
    --change 'ENV PATH=/bin' \
    --change 'CMD ["/bin/sh"]' \
    --message "persys-agent offline test image (hack/runtimes-up.sh)" \
    "$tmp/rootfs.tar" "$TEST_IMAGE" >/dev/null
  image_state=built
fi
image_id=$(dk image inspect --format '{{.Id}}' "$TEST_IMAGE")

printf 'runtimes up: docker %s [%s]; %s [%s]; image %s %s [%s]\n' \
  "$docker_version" "$docker_state" "$libvirt_version" "$libvirt_state" \
  "$TEST_IMAGE" "${image_id:0:19}" "$image_state"
