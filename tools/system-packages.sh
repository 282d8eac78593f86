#!/usr/bin/env bash
# system-packages.sh [--error-to-stdout] PACKAGE... : make sure these Debian/Ubuntu packages are installed.
# As root it installs the missing ones with apt-get; otherwise it stops at once with one line that
# gives the exact command to run. Used by the Makefile (make demo / make test) and by
# slurm/local-cluster.sh, so that every entry point installs the same way.
# --error-to-stdout: the failure line goes to stdout (the Makefile hands it to $(error), so that
# make stops with that one line instead of adding its own "*** Error 1" line).
set -euo pipefail

fail_fd=2
if [[ ${1:-} == --error-to-stdout ]]; then fail_fd=1; shift; fi
fail() { echo "$*" >&"$fail_fd"; exit 1; }

missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
((${#missing[@]})) || exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  fail "selfsup: needs the Debian/Ubuntu packages ${missing[*]}, and this machine has no apt-get: install their equivalents"
fi
if [[ $(id -u) != 0 ]]; then
  fail "selfsup: missing system packages; run: sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}"
fi

echo "selfsup: installing system packages: ${missing[*]}" >&2
# package scripts must not start system-wide daemons (munge, mariadb, slurm): the local Slurm
# cluster runs its own, under a state folder (no-op where a policy-rc.d already exists)
made_policy=0
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
fi
trap '[[ $made_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d' EXIT
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! { apt-get -o DPkg::Lock::Timeout=600 update -qq \
       && apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  rm -f "$log"
  fail "selfsup: apt-get could not install ${missing[*]} (its last lines are above)"
fi
rm -f "$log"
