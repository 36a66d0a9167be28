#!/usr/bin/env bash
# Generates development TLS material for the agent's mutual TLS, one
# certificate per identity (one CA signs them all, so the role comes from the
# subject, never from the chain alone):
#   ca.crt ca.key                a development CA (EC P-256, CA:true, keyCertSign)
#   agent.crt agent.key          the agent's server certificate: serverAuth ONLY,
#                                CN persys-agent, SANs localhost, 127.0.0.1,
#                                ::1, the hostname
#   scheduler.crt scheduler.key  client certificate, CN persys-scheduler,
#                                clientAuth (the scheduler's identity)
#   client.crt client.key        client certificate, CN persysctl, clientAuth
#                                (the operator's: persysctl's default file names)
#   viewer.crt viewer.key        client certificate, CN persys-viewer,
#                                clientAuth (for a policy rule mapping it to
#                                the viewer role)
# Usage: hack/dev-certs.sh [DIR]   (default ./dev/certs)
#
# Idempotent: certificates that exist, match their key, chain to the CA, carry
# the expected common name, extended key usage (exactly serverAuth or exactly
# clientAuth) and names, and stay valid for more than a day are kept. A new CA
# re-issues every leaf; a bad leaf (e.g. an agent.crt from an earlier version,
# with clientAuth too) is re-issued from the existing CA.
# Keys are PKCS#8 PEM ("BEGIN PRIVATE KEY"), certificates X.509 v3 with
# SKI/AKI: rustls/webpki rejects v1 certificates and CA certificates as leaves.
set -euo pipefail

DIR=${1:-./dev/certs}
DAYS=${PERSYS_CERT_DAYS:-365}
MIN_VALID=86400 # regenerate what expires within a day

die() { printf 'dev-certs: ERROR: %s\n' "$*" >&2; exit 1; }
log() { printf 'dev-certs: %s\n' "$*" >&2; }

command -v openssl >/dev/null || die "openssl is not installed (run hack/deps.sh)"

host=$(hostname 2>/dev/null || true)
fqdn=$(hostname -f 2>/dev/null || true)

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
umask 077
tmp=$(mktemp -d "$DIR/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# --- checks ------------------------------------------------------------------

# pubkey FILE: the public key of a certificate or a private key.
cert_pub() { openssl x509 -in "$1" -noout -pubkey 2>/dev/null; }
key_pub() { openssl pkey -in "$1" -pubout 2>/dev/null; }

# pair_ok NAME: NAME.crt and NAME.key exist, match, are PKCS#8 and the
# certificate stays valid for more than MIN_VALID seconds.
pair_ok() {
  local crt=$DIR/$1.crt key=$DIR/$1.key
  [[ -s $crt && -s $key ]] || return 1
  grep -q -- '-----BEGIN PRIVATE KEY-----' "$key" || return 1
  openssl x509 -in "$crt" -noout -checkend "$MIN_VALID" >/dev/null 2>&1 || return 1
  local a b
  a=$(cert_pub "$crt") || return 1
  b=$(key_pub "$key") || return 1
  [[ -n $a && $a == "$b" ]]
}

# How `openssl x509 -ext extendedKeyUsage` names the two uses.
EKU_SERVER="TLS Web Server Authentication"
EKU_CLIENT="TLS Web Client Authentication"

# eku_ok NAME server|client: the certificate's extended key usage carries
# that use and not the other one.
eku_ok() {
  local eku want other
  eku=$(openssl x509 -in "$DIR/$1.crt" -noout -ext extendedKeyUsage 2>/dev/null) || return 1
  case $2 in
    server) want=$EKU_SERVER other=$EKU_CLIENT ;;
    client) want=$EKU_CLIENT other=$EKU_SERVER ;;
    *) return 1 ;;
  esac
  [[ $eku == *"$want"* && $eku != *"$other"* ]]
}

# cn_ok NAME CN: the subject's common name is CN.
cn_ok() {
  local subject
  subject=$(openssl x509 -in "$DIR/$1.crt" -noout -subject -nameopt sep_multiline,sname 2>/dev/null) ||
    return 1
  grep -qx "[[:space:]]*CN=$2" <<<"$subject"
}

# leaf_ok NAME server|client CN [SAN...]: pair_ok, chains to ca.crt for that
# use, carries that use only, has common name CN and lists every SAN given (a
# SAN argument may list spellings separated by "|").
leaf_ok() {
  local name=$1 use=$2 cn=$3 sans purpose
  shift 3
  purpose=ssl$use
  pair_ok "$name" || return 1
  openssl verify -x509_strict -purpose "$purpose" -CAfile "$DIR/ca.crt" \
    "$DIR/$name.crt" >/dev/null 2>&1 || return 1
  eku_ok "$name" "$use" || return 1
  cn_ok "$name" "$cn" || return 1
  sans=$(openssl x509 -in "$DIR/$name.crt" -noout -ext subjectAltName 2>/dev/null) || return 1
  local want alt found alts
  for want in "$@"; do
    found=0
    IFS='|' read -ra alts <<<"$want"
    for alt in "${alts[@]}"; do
      [[ $sans == *"$alt"* ]] && found=1
    done
    ((found)) || return 1
  done
}

# --- generation --------------------------------------------------------------

new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
serial() { printf '0x%s' "$(openssl rand -hex 16)"; }

# install_pair NAME: move the freshly generated pair from tmp into DIR.
install_pair() {
  chmod 0600 "$tmp/$1.key"
  chmod 0644 "$tmp/$1.crt"
  mv -f "$tmp/$1.key" "$DIR/$1.key"
  mv -f "$tmp/$1.crt" "$DIR/$1.crt"
}

make_ca() {
  cat >"$tmp/ca.cnf" <<'EOF'
[ req ]
distinguished_name = dn
prompt             = no
x509_extensions    = v3_ca
[ dn ]
O  = persys-agent development
CN = persys-agent development CA
[ v3_ca ]
basicConstraints       = critical, CA:true, pathlen:0
keyUsage               = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always
EOF
  new_key "$tmp/ca.key"
  openssl req -new -x509 -sha256 -config "$tmp/ca.cnf" -key "$tmp/ca.key" \
    -days "$DAYS" -set_serial "$(serial)" -out "$tmp/ca.crt"
  install_pair ca
}

# make_leaf NAME CN EKU [SAN...]: key, CSR, certificate signed by the CA.
make_leaf() {
  local name=$1 cn=$2 eku=$3
  shift 3
  {
    printf '[ leaf ]\n'
    printf 'basicConstraints       = critical, CA:false\n'
    printf 'keyUsage               = critical, digitalSignature\n'
    printf 'extendedKeyUsage       = %s\n' "$eku"
    printf 'subjectKeyIdentifier   = hash\n'
    printf 'authorityKeyIdentifier = keyid:always\n'
    if (($#)); then
      printf 'subjectAltName         = @alt\n[ alt ]\n'
      local san dns=0 ip=0
      for san in "$@"; do
        case $san in
          DNS:*) dns=$((dns + 1)); printf 'DNS.%d = %s\n' "$dns" "${san#DNS:}" ;;
          IP:*) ip=$((ip + 1)); printf 'IP.%d = %s\n' "$ip" "${san#IP:}" ;;
        esac
      done
    fi
  } >"$tmp/$name.ext"
  new_key "$tmp/$name.key"
  openssl req -new -sha256 -key "$tmp/$name.key" -subj "/O=persys-agent development/CN=$cn" \
    -out "$tmp/$name.csr"
  openssl x509 -req -sha256 -in "$tmp/$name.csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" \
    -set_serial "$(serial)" -days "$DAYS" \
    -extfile "$tmp/$name.ext" -extensions leaf -out "$tmp/$name.crt" 2>/dev/null
  install_pair "$name"
}

# Server SANs: localhost, loopback addresses, the host's names.
server_sans=(DNS:localhost IP:127.0.0.1 IP:::1)
for n in "$host" "$fqdn"; do
  [[ -n $n && $n != localhost ]] || continue
  [[ " ${server_sans[*]} " == *" DNS:$n "* ]] || server_sans+=("DNS:$n")
done
# How `openssl x509 -ext subjectAltName` prints them (for the check).
server_san_text=()
for san in "${server_sans[@]}"; do
  case $san in
    IP:::1) server_san_text+=("IP Address:0:0:0:0:0:0:0:1|IP Address:::1") ;;
    IP:*) server_san_text+=("IP Address:${san#IP:}") ;;
    *) server_san_text+=("$san") ;;
  esac
done

changed=()
ca_ok() {
  pair_ok ca || return 1
  # Must be a CA that may sign: v3, CA:true, keyCertSign.
  local text
  text=$(openssl x509 -in "$DIR/ca.crt" -noout -text 2>/dev/null) || return 1
  [[ $text == *"Version: 3"* && $text == *"CA:TRUE"* && $text == *"Certificate Sign"* ]] || return 1
  openssl verify -x509_strict -CAfile "$DIR/ca.crt" "$DIR/ca.crt" >/dev/null 2>&1
}

# The client identities: file name and common name.
clients=(scheduler:persys-scheduler client:persysctl viewer:persys-viewer)

if ! ca_ok; then
  log "creating development CA in $DIR"
  make_ca
  changed+=(ca)
  # issued by another CA
  rm -f "$DIR/agent.crt"
  for pair in "${clients[@]}"; do rm -f "$DIR/${pair%%:*}.crt"; done
fi
if ! leaf_ok agent server persys-agent "${server_san_text[@]}"; then
  log "issuing server certificate (CN persys-agent, serverAuth only; ${server_sans[*]})"
  make_leaf agent persys-agent "serverAuth" "${server_sans[@]}"
  changed+=(agent)
fi
for pair in "${clients[@]}"; do
  name=${pair%%:*} cn=${pair#*:}
  if ! leaf_ok "$name" client "$cn"; then
    log "issuing client certificate $name.crt (CN $cn, clientAuth)"
    make_leaf "$name" "$cn" "clientAuth"
    changed+=("$name")
  fi
done

# Final check of what is on disk, whatever path we took.
leaf_ok agent server persys-agent "${server_san_text[@]}" ||
  die "agent.crt does not verify against ca.crt as a serverAuth-only certificate for persys-agent"
for pair in "${clients[@]}"; do
  name=${pair%%:*} cn=${pair#*:}
  leaf_ok "$name" client "$cn" ||
    die "$name.crt does not verify against ca.crt as a clientAuth-only certificate for $cn"
done

if ((${#changed[@]})); then
  printf 'dev-certs: %s: generated %s\n' "$DIR" "${changed[*]}"
else
  printf 'dev-certs: %s: existing certificates are valid, kept\n' "$DIR"
fi
