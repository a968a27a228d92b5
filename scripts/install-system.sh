#!/usr/bin/env bash
# Installs the system tools the tests and benchmarks need, only where missing (idempotent):
# redis-server (Redis journal tests), wrk (bench), promtool (metrics/rules checks), java and
# Google's Cloud Firestore emulator (google-cloud-cli-firestore-emulator, when apt knows the
# package: it comes from Google's Cloud SDK apt repository; without it the Firestore tests skip).
# Debian packages; needs root or sudo. Prints what it did, one line when everything is there.
set -euo pipefail

EMULATOR_PACKAGE=google-cloud-cli-firestore-emulator
# The emulator JAR where sinks/firestore/emulator.py looks for it (keep the two lists in step).
emulator_jar() {
  local jar
  if [ -n "${FIRESTORE_EMULATOR_JAR:-}" ] && [ -f "$FIRESTORE_EMULATOR_JAR" ]; then return 0; fi
  for jar in \
      /usr/lib/google-cloud-sdk/platform/cloud-firestore-emulator/cloud-firestore-emulator.jar \
      /usr/share/google-cloud-sdk/platform/cloud-firestore-emulator/cloud-firestore-emulator.jar \
      /opt/google-cloud-sdk/platform/cloud-firestore-emulator/cloud-firestore-emulator.jar \
      "${HOME:-}"/google-cloud-sdk/platform/cloud-firestore-emulator/cloud-firestore-emulator.jar \
      "${HOME:-}"/.cache/firebase/emulators/cloud-firestore-emulator-v*.jar; do
    [ -f "$jar" ] && return 0
  done
  return 1
}

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v java >/dev/null 2>&1 || need+=(default-jre-headless)
present="redis-server, wrk, promtool, java, Firestore emulator"
if ! emulator_jar; then
  if apt-cache show "$EMULATOR_PACKAGE" >/dev/null 2>&1; then
    need+=("$EMULATOR_PACKAGE")
  else
    present="redis-server, wrk, promtool, java"
    echo "install-system: $EMULATOR_PACKAGE is not available from apt (Google's Cloud SDK" \
         "repository is not configured): the Firestore tests will skip"
  fi
fi

if [ ${#need[@]} -eq 0 ]; then
  echo "install-system: $present already present"
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
