#!/usr/bin/env bash
# Install the real S2S peers the interop tests federate with (tests/interop/):
# Prosody 0.12 + lua-unbound and ejabberd 23.01 from Debian packages, and
# nats-server, the bus the cluster tests start (tests/integration/natsd.py).
#
# Quick and idempotent: does nothing when they are present. As root with apt it
# installs them without letting their system services start (policy-rc.d). It
# never stops, starts or disables a service the machine runs: the interop tests
# run the peers (and nats-server) as their own subprocesses on free ports of
# 127.0.0.x, with no epmd and no node name, so a system prosody, ejabberd or
# nats-server does not disturb them.
# Without root or apt it says how to enable the interop tests and exits 0 (the
# tests then skip, except under CI=true where a missing peer fails).
set -euo pipefail

PACKAGES=(prosody ejabberd lua-unbound nats-server)
HINT="interop tests will skip: run 'make peers' as root on Debian/Ubuntu (apt-get install ${PACKAGES[*]})"

missing=()
for package in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-peers: ${PACKAGES[*]} already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-peers: missing ${missing[*]}; $HINT"
    exit 0
fi

policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# written by scripts/install-peers.sh: no service starts during install\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    created_policy=1
fi
remove_policy() {
    if [ "$created_policy" -eq 1 ]; then
        rm -f "$policy"
    fi
}
trap remove_policy EXIT

echo "install-peers: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
echo "install-peers: installed $(dpkg-query -W -f='${Package} ${Version}  ' "${PACKAGES[@]}")"
