#!/usr/bin/env bash
# Installs the system tools the tests and benchmarks need, only where missing (idempotent):
# redis-server (Redis journal tests), wrk (bench), promtool (metrics/rules checks), java (Firestore
# emulator). Debian packages; needs root or sudo. Prints what it did.
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v java >/dev/null 2>&1 || need+=(default-jre-headless)

if [ ${#need[@]} -eq 0 ]; then
  echo "install-system: redis-server, wrk, promtool, java already present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-system: need root (or sudo) to apt-get install: ${need[*]}" >&2
    exit 1
  fi
fi
echo "install-system: apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# --no-install-recommends keeps the prometheus package from pulling in a UI; the server it ships
# is not started (policy-rc.d below), only promtool is used.
printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
$SUDO chmod +x /usr/sbin/policy-rc.d
trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
for service in redis-server prometheus; do
  $SUDO service "$service" stop >/dev/null 2>&1 || true
done
echo "install-system: done"
