#!/usr/bin/env bash
# Installs what the replica test needs: Debian's nginx-light (as root, with apt-get) and
# PostgreSQL's server programs (initdb, pg_ctl). The test starts its own private cluster and
# nginx on loopback; no system service is started or needed.
set -euo pipefail
missing=()
[ -x /usr/sbin/nginx ] || missing+=(nginx-light)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # Debian's package starts a system nginx; the test needs none.
  if command -v nginx >/dev/null && [ -f /run/nginx.pid ]; then nginx -s stop || true; fi
else
  echo "install ${missing[*]} (apt-get install ${missing[*]}) for the replica test" >&2
fi
