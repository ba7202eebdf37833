#!/usr/bin/env bash
# Installs promtool (Debian's `prometheus` package) for tests/test_monitoring.py when it is
# missing: as root with apt-get, else says how and exits 1 (the test then skips, or fails in CI).
# The package's service is not started: policy-rc.d refuses it for the install.
set -euo pipefail
command -v promtool >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || {
    apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
  echo "installed $(promtool --version 2>&1 | head -n1)" >&2
  exit 0
fi
echo "promtool is missing; install Debian's package as root: sudo apt-get install prometheus" >&2
exit 1
