#!/usr/bin/env bash
# Installs what baton-cluster's tests need, idempotently: avahi-daemon, which the mDNS test
# (crates/baton-cluster/tests/mdns_avahi.rs) starts beside baton's own responder to prove the two
# coexist. The test starts and stops the daemon itself; nothing is left running.
set -euo pipefail

if command -v avahi-daemon >/dev/null 2>&1 || [ -x /usr/sbin/avahi-daemon ]; then
    echo "avahi-daemon: installed"
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends avahi-daemon
# The package's maintainer scripts may start a system instance where an init system runs; the
# test uses a running instance as it finds it, so that is harmless.
echo "avahi-daemon: installed $(avahi-daemon --version 2>/dev/null || true)"
