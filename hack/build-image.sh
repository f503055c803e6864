#!/usr/bin/env bash
# Builds the operator image from the Dockerfile without a Docker engine or a container registry:
# buildah (vfs storage, chroot isolation) runs the Dockerfile on a local stand-in for its base
# image, python:3.11-slim, made by mmdebstrap from Debian bookworm's packages (Python 3.11, pip,
# ca-certificates). Both come from Debian (make deps). Docker users keep `docker build .`.
#
# The image is tagged with the chart's default name, <values.yaml image.repository>:<pyproject
# version> (the chart's appVersion), and unpacked for hack/run-image.sh. Everything is cached under
# ~/.cache/tenancy-operator/image, keyed by the content of the build's inputs (Dockerfile,
# pyproject.toml, README.md, operator/, this script): an unchanged tree is not rebuilt.
# Prints the image's directory last: rootfs/, config.json (the OCI image config), name.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache_root=${TENANCY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tenancy-operator}
cache="$cache_root/image"
log() { printf '[build-image %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# --print-name: the name only (the chart's default image; tests/unit/test_image_name.py).
version=$(sed -nE 's/^version = "([^"]+)"/\1/p' "$root/pyproject.toml" | head -n1)
repository=$(sed -nE 's/^  repository: *"?([^" ]+)"?.*/\1/p' "$root/helm/tenancy-operator/values.yaml" | head -n1)
[ -n "$version" ] && [ -n "$repository" ] || { echo "cannot read the version or image.repository" >&2; exit 1; }
image="$repository:$version"
if [ "${1:-}" = --print-name ]; then echo "$image"; exit 0; fi

for tool in buildah mmdebstrap; do
  command -v "$tool" >/dev/null || { echo "$tool not found: run make deps (hack/install-system-deps.sh)" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "hack/build-image.sh needs root (buildah's chroot isolation, mmdebstrap)" >&2; exit 1; }

# The base: what the Dockerfile needs of python:3.11-slim (python and pip, apt-get, useradd).
# Debian's pip refuses to install outside a venv (PEP 668); python:3.11-slim's does not.
SUITE=bookworm
BASE_PACKAGES=python3.11,python3-pip,python-is-python3,ca-certificates
base_key=$(printf '%s\n' "$SUITE" "$BASE_PACKAGES" "v1" | sha256sum | cut -c1-12)
base_image="localhost/tenancy-python-base:3.11-$SUITE-$base_key"

# Inputs of the build: the Dockerfile, its context (.dockerignore lets through only these) and this
# script. Sorted paths and contents, without what .dockerignore leaves out.
key=$(
  cd "$root"
  find Dockerfile pyproject.toml README.md operator hack/build-image.sh -type f \
      ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
)
out="$cache/build-$key"
cached() {
  [ -f "$out/name" ] && [ -f "$out/config.json" ] && [ -d "$out/rootfs/usr" ] || return 1
  log "image $image of this tree ($key) is cached in $out"
  touch "$out"
  echo "$out"
}
cached && exit 0

# One build at a time on this machine (checkouts share the cache); the one we waited for may have
# built this very tree.
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
cached && exit 0
storage=(--root "$cache/storage" --runroot "$cache/run" --storage-driver vfs)
start=$SECONDS

if ! buildah "${storage[@]}" inspect --type image "$base_image" >/dev/null 2>&1; then
  log "building the base $base_image from Debian $SUITE with mmdebstrap (first run only)"
  tar="$cache/base-$SUITE-$base_key.tar"
  # merged-usr as debootstrap and Debian's own images do (the usrmerge package would pull in perl).
  mmdebstrap --quiet --format=tar --variant=minbase --include="$BASE_PACKAGES" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    "$SUITE" "$tar.part" http://deb.debian.org/debian >"$cache/mmdebstrap.log" 2>&1 \
    || { tail -n 40 "$cache/mmdebstrap.log" >&2; echo "mmdebstrap failed; log: $cache/mmdebstrap.log" >&2; exit 1; }
  mv "$tar.part" "$tar"
  c=$(buildah "${storage[@]}" from scratch)
  buildah "${storage[@]}" add --quiet "$c" "$tar" /
  buildah "${storage[@]}" config --env LANG=C.UTF-8 --cmd python3 "$c"
  buildah "${storage[@]}" commit --quiet --rm "$c" "$base_image" >/dev/null
  rm -f "$tar"
  log "base built in $((SECONDS - start)) s"
fi

# pip inside the build trusts the host's CA bundle (e.g. a TLS-inspecting proxy's CA): a pip.conf
# in a scratch HOME bind-mounted over the base's empty /root for the RUN steps only, so nothing of
# it lands in the image.
build_home=$(mktemp -d)
trap 'rm -rf "$build_home"' EXIT
ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
if [ -f "$ca" ]; then
  mkdir -p "$build_home/.config/pip"
  cp "$ca" "$build_home/ca.crt"
  printf '[global]\ncert = /root/ca.crt\n' >"$build_home/.config/pip/pip.conf"
fi

log "building $image from the Dockerfile with buildah (vfs, chroot isolation)"
bud_start=$SECONDS
buildah "${storage[@]}" bud --quiet --isolation chroot --pull=never --layers=false \
  --volume "$build_home:/root" \
  --build-arg PYTHON_IMAGE="$base_image" \
  --tag "$image" --tag "localhost/tenancy-operator:build-$key" \
  --file "$root/Dockerfile" "$root" >&2
log "image built in $((SECONDS - bud_start)) s"

# Unpacked for hack/run-image.sh; the OCI config tells it the user, entrypoint and environment.
tmp=$(mktemp -d "$cache/.build-$key.XXXX")
buildah "${storage[@]}" inspect --type image "$image" \
  | python3 -c 'import json, sys; json.dump(json.load(sys.stdin)["OCIv1"]["config"], sys.stdout, indent=1)' \
  >"$tmp/config.json"
c=$(buildah "${storage[@]}" from --pull-never "$image")
mnt=$(buildah "${storage[@]}" mount "$c")
mkdir "$tmp/rootfs"
tar -C "$mnt" --numeric-owner -cf - . | tar -C "$tmp/rootfs" --numeric-owner -xpf -
buildah "${storage[@]}" umount "$c" >/dev/null
buildah "${storage[@]}" rm "$c" >/dev/null
echo "$image" >"$tmp/name"
rm -rf "$out"
mv "$tmp" "$out"
# Builds unused for two days go (not all others: another checkout on this machine may be running
# one), with their images.
for old in $(find "$cache" -maxdepth 1 -name 'build-*' ! -name "build-$key" -mmin +2880 -printf '%f\n'); do
  rm -rf "${cache:?}/$old"
  buildah "${storage[@]}" rmi "localhost/tenancy-operator:$old" >/dev/null 2>&1 || true
done
log "done in $((SECONDS - start)) s: $image in $out"
echo "$out"
