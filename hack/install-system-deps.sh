#!/usr/bin/env bash
# Installs what the project needs from Debian on a fresh machine: PostgreSQL (server for tests and
# the dev stack, client tools such as pg_dump for the operator). Idempotent; no-op when present.
set -euo pipefail
need=()
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || need+=(postgresql)
command -v pg_dump >/dev/null || need+=(postgresql-client)
command -v psql >/dev/null || need+=(postgresql-client)
# The local stack's S3 object store (s3proxy, a Java jar fetched by tenancy_devenv) needs Java 17+.
command -v java >/dev/null || need+=(default-jre-headless)
# Observability tests: promtool and a real Prometheus server; Lua for the Argo CD health check
# (Argo CD runs Lua 5.1 semantics, so we test with 5.1 and 5.4).
{ command -v promtool >/dev/null && command -v prometheus >/dev/null; } || need+=(prometheus)
command -v lua5.1 >/dev/null || need+=(lua5.1)
command -v lua5.4 >/dev/null || need+=(lua5.4)
# The image without a Docker engine (hack/build-image.sh, tests/integration/test_image.py): buildah
# runs the Dockerfile on a base that mmdebstrap makes from Debian's packages.
command -v buildah >/dev/null || need+=(buildah)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if [ ${#need[@]} -gt 0 ]; then
  echo "[install-system-deps] installing: ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The tests run their own Prometheus on a free port; the package's system service is not needed.
  if [[ " ${need[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
  fi
fi
command -v go >/dev/null || { echo "Go >= 1.26 is required to build the test control plane: Kubernetes 1.36 asks for it (https://go.dev/dl)" >&2; exit 1; }
