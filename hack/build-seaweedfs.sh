#!/usr/bin/env bash
# Builds SeaweedFS's `weed` from the Go module proxy, once per machine: the integration suite's
# second S3-compatible server, the one that honours server-side encryption (SSE-S3), which s3proxy
# ignores. Cached outside the work tree, keyed by version. Prints the binary's path last.
set -euo pipefail

# A pseudo-version: SeaweedFS tags releases without a module-compatible version.
SEAWEEDFS_VERSION=v0.0.0-20261109003541-7506e5f91cd6
cache_root=${TENANCY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tenancy-operator}
bin="$cache_root/seaweedfs-$SEAWEEDFS_VERSION/bin"
mkdir -p "$bin"

export GOWORK=off GOTOOLCHAIN=local GOFLAGS=-mod=mod
# No ',direct': a module the proxy lacks fails fast instead of trying git over the network.
export GOPROXY=${GOPROXY_OVERRIDE:-https://proxy.golang.org}

log() { printf '[build-seaweedfs %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ ! -x "$bin/weed" ]; then
  log "building SeaweedFS weed $SEAWEEDFS_VERSION (first run on this machine only; about 10 min on 2 cores)"
  start=$SECONDS
  # Its go.mod has replace directives, so `go install module@version` refuses it: build the
  # downloaded module as the main module instead, from a writable copy.
  src=$(go mod download -json "github.com/seaweedfs/seaweedfs@$SEAWEEDFS_VERSION" \
        | sed -nE 's/^[[:space:]]*"Dir": "(.*)",?$/\1/p')
  [ -n "$src" ] && [ -d "$src" ] || { echo "go mod download gave no source directory for seaweedfs" >&2; exit 1; }
  tmp=$(mktemp -d "$bin/.weed.XXXX")
  trap 'rm -rf "$tmp"' EXIT
  cp -r "$src" "$tmp/src" && chmod -R u+w "$tmp/src"
  (cd "$tmp/src" && go build -trimpath -ldflags "-s -w" -o "$tmp/weed" ./weed)
  mv "$tmp/weed" "$bin/weed"
  log "weed built in $((SECONDS - start)) s"
fi

echo "$bin/weed"
