#!/usr/bin/env bash
# Installs what the tests need (Debian packages for the real-client tests), then runs every
# test of the workspace. The network tests need root (namespaces, TAP devices); run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real third-party clients and the tools the namespace tests drive.
packages=(iproute2 iputils-ping tcpdump isc-dhcp-client udhcpc busybox-static dnsmasq-base dnsutils curl iperf3 python3 python3-prometheus-client python3-scapy qemu-system-x86 tshark ethtool systemd util-linux softether-vpnserver softether-vpnclient softether-vpncmd)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: missing packages: ${missing[*]}; install them (as root) or run this script as root" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # SoftEther's packages would start system-wide services (listening on 443, 992, 1194 and
  # 5555): the tests run their own copies in namespaces, so services installed now stay
  # stopped (policy-rc.d says no, unless the machine already has its own policy).
  own_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# The WASM policies the policy host's tests load (target/policies/*.wasm).
scripts/build-policies.sh --quiet

# A CI machine builds once from a clean clone: incremental state would only take disk.
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL=0; fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary, the last often a
# doc-test run with nothing in it).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
