#!/bin/sh
# Regenerates the TLS and key fixtures of oclocks-client's unit tests.
# Test-only material: never use these keys for anything else.
# Certificates are valid for 100 years so the tests do not rot.
set -eu
cd "$(dirname "$0")"
days=36500
ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"

ca() { # name
  openssl req -x509 $ec -keyout "$1.key" -out "$1.pem" -days $days \
    -subj "/CN=$1" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
}
leaf() { # name ca san eku
  openssl req $ec -keyout "$1.key" -out "$1.csr" -subj "/CN=$1" 2>/dev/null
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\nsubjectAltName=%s\n' "$4" "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial \
    -out "$1.pem" -days $days -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

ca ca
ca other-ca
leaf server ca "DNS:localhost,IP:127.0.0.1" serverAuth
leaf client ca "URI:oclocks:client:test" clientAuth
leaf stranger other-ca "URI:oclocks:client:stranger" clientAuth
rm -f ./*.srl ca.key other-ca.key
openssl genpkey -algorithm ed25519 -out owner-ed25519.pem
