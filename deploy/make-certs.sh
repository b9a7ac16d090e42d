#!/bin/sh
# Make a private CA and one certificate signed by it for a Dask TLS cluster (scheduler, workers and the
# dkmeans client all present it; Dask's TLS is mutual, so a peer without a certificate from this CA is
# refused). Usage: deploy/make-certs.sh [DIR]   (default ./certs; needs openssl)
set -eu
dir=${1:-certs}
days=${DKMEANS_CERT_DAYS:-365}
mkdir -p "$dir"
cd "$dir"
umask 077
ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
openssl req -x509 $ec -keyout ca.key -out ca.crt -days "$days" -subj "/CN=dkmeans-cluster-ca" 2>/dev/null
openssl req $ec -keyout node.key -out node.csr -subj "/CN=dkmeans-node" 2>/dev/null
printf 'subjectAltName=DNS:scheduler,DNS:scheduler-tls,DNS:localhost,IP:127.0.0.1\n' > node.ext
openssl x509 -req -in node.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out node.crt -days "$days" \
    -extfile node.ext 2>/dev/null
rm -f node.csr node.ext ca.srl
chmod 644 ca.crt node.crt
echo "wrote $(pwd)/ca.crt, node.crt, node.key (and ca.key: keep it off the cluster)"
