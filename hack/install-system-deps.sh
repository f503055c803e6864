#!/usr/bin/env bash
# Installs what the project needs from Debian on a fresh machine: PostgreSQL (server for tests and
# the dev stack, client tools such as pg_dump for the operator). Idempotent; no-op when present.
set -euo pipefail
need=()
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || need+=(postgresql)
command -v pg_dump >/dev/null || need+=(postgresql-client)
command -v psql >/dev/null || need+=(postgresql-client)
if [ ${#need[@]} -gt 0 ]; then
  echo "[install-system-deps] installing: ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v go >/dev/null || { echo "Go >= 1.24 is required to build the test control plane (https://go.dev/dl)" >&2; exit 1; }
