#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager, kubectl) and helm
# from the Go module proxy, once per machine. The binaries are cached outside the work tree, keyed
# by version, so only the first run pays for the build. Prints the cache's bin directory last.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# The version a wrapper module requires, whether in a require block or on a require line.
required() { sed -nE "s#^[[:space:]]*(require[[:space:]]+)?$2[[:space:]]+(v[^[:space:]]+).*#\2#p" "$1" | head -n1; }
K8S_VERSION=$(required "$here/controlplane/kubernetes/go.mod" k8s.io/kubernetes)
ETCD_VERSION=$(required "$here/controlplane/etcd/go.mod" go.etcd.io/etcd/server/v3)
[ -n "$K8S_VERSION" ] && [ -n "$ETCD_VERSION" ] || { echo "cannot read versions from the wrapper go.mod files" >&2; exit 1; }
HELM_VERSION=v3.19.5
cache_root=${TENANCY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tenancy-operator}
bin="$cache_root/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION/bin"
mkdir -p "$bin"

export GOWORK=off GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
# No ',direct': a module the proxy lacks fails fast instead of trying git over the network.
export GOPROXY=${GOPROXY_OVERRIDE:-https://proxy.golang.org}

log() { printf '[build-control-plane %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

have_all() { for b in "$@"; do [ -x "$bin/$b" ] || return 1; done; }

if ! have_all etcd; then
  log "building etcd $ETCD_VERSION (first run on this machine only)"
  start=$SECONDS
  tmp=$(mktemp -d "$bin/.etcd.XXXX")
  (cd "$here/controlplane/etcd" && go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" .)
  mv "$tmp/etcd" "$bin/etcd" && rmdir "$tmp"
  log "etcd built in $((SECONDS - start)) s"
fi

if ! have_all kube-apiserver kube-controller-manager kubectl; then
  log "building kube-apiserver, kube-controller-manager, kubectl $K8S_VERSION (first run only; about 15-25 min on 2 cores)"
  start=$SECONDS
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  stamp=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    stamp+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  tmp=$(mktemp -d "$bin/.k8s.XXXX")
  (cd "$here/controlplane/kubernetes" && go build -trimpath -ldflags "-s -w $stamp" -o "$tmp/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kubectl)
  mv "$tmp"/* "$bin/" && rmdir "$tmp"
  log "kubernetes binaries built in $((SECONDS - start)) s"
fi

if ! have_all helm; then
  log "building helm $HELM_VERSION"
  start=$SECONDS
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  ld+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor"
  ld+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor"
  tmp=$(mktemp -d "$bin/.helm.XXXX")
  GOBIN="$tmp" go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mv "$tmp/helm" "$bin/helm" && rmdir "$tmp"
  log "helm built in $((SECONDS - start)) s"
fi

echo "$bin"
