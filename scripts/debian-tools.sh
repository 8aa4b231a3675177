#!/usr/bin/env bash
# Debian tools the tests run: promtool (package prometheus) checks and unit-tests the
# alerting rules and the dashboard's queries; systemd-analyze (package systemd, which
# brings libseccomp2) verifies the units. Installs only what is missing, so a re-run
# costs two `command -v`.
set -euo pipefail
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "debian-tools: installing ${missing[*]}" >&2
sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
$sudo_cmd apt-get update -qq >&2
# promtool is all the tests use of the prometheus package: its server must not start.
# Where no policy-rc.d says so already, one refuses every service start for the install.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    trap '$sudo_cmd rm -f "$policy"' EXIT
    printf '#!/bin/sh\nexit 101\n' | $sudo_cmd tee "$policy" >/dev/null
    $sudo_cmd chmod 755 "$policy"
fi
DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >&2
