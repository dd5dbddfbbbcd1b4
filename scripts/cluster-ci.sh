#!/usr/bin/env bash
# Installs what the cluster tests need, idempotently:
# - avahi-daemon, which the mDNS test (crates/baton-cluster/tests/mdns_avahi.rs) starts beside
#   baton's own responder to prove the two coexist. The test starts and stops the daemon itself.
# - iproute2 (`ip`), with which tests/cluster_netns.rs builds its namespaces, bridge and veth
#   pairs (it needs root; CI runs as root).
# Then, with --run, runs the cluster tests.
set -euo pipefail

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
missing=()
if ! command -v avahi-daemon >/dev/null 2>&1 && [ ! -x /usr/sbin/avahi-daemon ]; then
    missing+=(avahi-daemon)
fi
if ! command -v ip >/dev/null 2>&1; then
    missing+=(iproute2)
fi
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    # The package's maintainer scripts may start a system avahi where an init system runs; the
    # test uses a running instance as it finds it, so that is harmless.
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "avahi-daemon: $(avahi-daemon --version 2>/dev/null || echo installed)"
echo "ip: $(ip -V 2>/dev/null)"

if [ "${1:-}" = "--run" ]; then
    cd "$(dirname "$0")/.."
    cargo test --locked -p baton-proto -p baton-cluster
    cargo test --locked --test cluster_auth --test cluster_plan --test cluster_weights \
        --test cluster_netns --test cluster_loopback
fi
