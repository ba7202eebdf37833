#!/usr/bin/env bash
# Installs Debian's wrk for `make bench` when it is missing: as root with apt-get, else says how.
set -euo pipefail
command -v wrk >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q wrk >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null; }
  echo "make bench: installed $(wrk --version 2>&1 | head -n1 | cut -d' ' -f1-2)" >&2
  exit 0
fi
echo "make bench: wrk (the load generator) is missing. Install Debian's package as root:" >&2
echo "  sudo apt-get install wrk" >&2
echo "or run the slower Python client instead: make bench BENCH_ARGS='--loadgen python'" >&2
exit 1
