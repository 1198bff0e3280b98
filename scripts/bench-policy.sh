#!/usr/bin/env bash
# New TCP connections per second through hubnat (TAP backend) with and without WASM policies.
#
#   scripts/bench-policy.sh              # as root; N=2000 ROUNDS=3
#   N=500 ROUNDS=1 scripts/bench-policy.sh
#   HUBNAT=target/debug/hubnat scripts/bench-policy.sh   # an already built binary
#
# In namespaces of its own (DESIGN.md safety rules; 10.77.x.y and the segment's 192.168.30.x
# only):
#   server  10.77.0.2/24 (veth to the gateway); a one-byte TCP echo on port 7000 (python3:
#           accept, read one byte, write it back, close)
#   gateway 10.77.0.1/24, its only outside link; runs `hubnat run` (release build) on a TAP
#           device, which is moved into the client namespace
#   client  the segment's client; address and default route from hubnat's DHCP (udhcpc)
# Three configurations, measured in ROUNDS interleaved rounds (none, deny, deny+dhcp, none,
# ...), hubnat restarted and the client namespace made afresh for each measurement:
#   none       no [[policy]]
#   deny       deny-destinations refusing other ports and networks (25,465,587 and
#              203.0.113.0/24), so every measured connection is checked and allowed
#   deny+dhcp  per-mac-dhcp (a MAC prefix, DNS servers, routes) then deny-destinations
# After one measurement that is not counted (the first hubnat of a run is slower), each
# measurement: 50 connections to warm up, then N sequential connections from one python3
# process in the client namespace (connect, send 1 byte, read it back, close), timed as a
# whole. It prints a markdown table with the median connections per second of each
# configuration, every round's figure, and the ratio to "none". Not run by CI.
# Everything it starts is stopped by PID and its namespaces and files are deleted on exit, also
# on Ctrl-C or an error.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

N=${N:-2000}
ROUNDS=${ROUNDS:-3}
SERVER_IP=10.77.0.2
PORT=7000
CONFIGS=(none deny deny+dhcp)

if [ "$(id -u)" -ne 0 ]; then
  echo "bench-policy.sh: needs root (network namespaces, TAP devices)" >&2
  exit 1
fi
for p in ip udhcpc python3 cargo; do
  command -v "$p" >/dev/null || { echo "bench-policy.sh: $p is not installed (scripts/test.sh installs the test clients)" >&2; exit 1; }
done

target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
if [ -z "${HUBNAT:-}" ]; then
  echo "building hubnat (release)..."
  cargo build --release --locked --bin hubnat
  HUBNAT="$target_dir/release/hubnat"
fi
[ -x "$HUBNAT" ] || { echo "bench-policy.sh: no binary at $HUBNAT" >&2; exit 1; }
DENY_WASM="$target_dir/policies/deny-destinations.wasm"
DHCP_WASM="$target_dir/policies/per-mac-dhcp.wasm"
if [ ! -f "$DENY_WASM" ] || [ ! -f "$DHCP_WASM" ]; then
  echo "building the policies..."
  scripts/build-policies.sh --quiet
fi

work=$(mktemp -d /tmp/hubnat-bench-policy.XXXXXX)
tag=$(( $$ % 100000 ))
NS_SRV="hpsv$tag" NS_GW="hpgw$tag" NS_CL="hpcl$tag"
TAP="hptap$tag"
pids=()    # the echo server: lives as long as the run
bpids=()   # hubnat: one measurement
HUBNAT_PID=


cleanup() {
  local rc=$?
  stop_list bpids
  stop_list pids
  local ns
  for ns in "$NS_SRV" "$NS_GW" "$NS_CL"; do ip netns del "$ns" 2>/dev/null || true; done
  if [ "$rc" -ne 0 ] && [ -f "$work/hubnat.log" ]; then
    echo "---- hubnat.log (last 30 lines) ----" >&2
    tail -n 30 "$work/hubnat.log" >&2 || true
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then echo "bench-policy.sh: timed out waiting for $what" >&2; return 1; fi
    sleep 0.1
  done
}


# The server and gateway namespaces and the echo server.
for ns in "$NS_SRV" "$NS_GW"; do new_ns "$ns"; done
ip -n "$NS_GW" link add "hpup$tag" type veth peer name "hpsg$tag" netns "$NS_SRV"
ip -n "$NS_GW" link set "hpup$tag" up
ip -n "$NS_SRV" link set "hpsg$tag" up
ip -n "$NS_GW" addr add 10.77.0.1/24 dev "hpup$tag"
ip -n "$NS_SRV" addr add "$SERVER_IP/24" dev "hpsg$tag"
cat >"$work/echo1.py" <<'EOF'
import socket, sys
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2])))
ls.listen(128)
while True:
    c, _ = ls.accept()
    try:
        b = c.recv(1)
        if b:
            c.sendall(b)
    except OSError:
        pass
    c.close()
EOF
ip netns exec "$NS_SRV" python3 "$work/echo1.py" "$SERVER_IP" "$PORT" >"$work/echo.log" 2>&1 &
pids+=($!)
wait_for 10 "the echo server" sh -c "ip netns exec $NS_SRV ss -Hlnt | grep -q '$SERVER_IP:$PORT '"

cat >"$work/connect.py" <<'EOF'
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
started = time.perf_counter()
for _ in range(n):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"x")
    if s.recv(1) != b"x":
        sys.exit("no echo")
    s.close()
print("%.1f" % (n / (time.perf_counter() - started)))
EOF

policies() { # policies CONFIG: the [[policy]] tables of a configuration
  local deny="[[policy]]
name = \"deny\"
path = \"$DENY_WASM\"
on_error = \"allow\"
timeout = \"100ms\"
[policy.config]
ports = \"25,465,587\"
cidrs = \"203.0.113.0/24\""
  case "$1" in
    none) ;;
    deny) echo "$deny" ;;
    deny+dhcp) cat <<EOF
[[policy]]
name = "lab-macs"
path = "$DHCP_WASM"
on_error = "allow"
timeout = "100ms"
[policy.config]
mac_prefix = "02:aa:bb"
dns = "10.77.0.53"
routes = "10.77.50.0/24 via 192.168.30.254"

$deny
EOF
      ;;
  esac
}

# measure CONFIG: a fresh client namespace, hubnat with CONFIG's policies, a lease, the
# warm-up, then N connections; prints connections per second.
measure() {
  local config=$1
  ip netns del "$NS_CL" 2>/dev/null || true
  new_ns "$NS_CL"
  rm -rf "$work/state"
  cat >"$work/hubnat.toml" <<EOF
[host]
mac = "00:ac:11:22:33:44"
[dns]
upstream = ["$SERVER_IP"]
[backend]
kind = "tap"
[backend.tap]
name = "$TAP"
[state]
dir = "$work/state"
[log]
level = "warn"

$(policies "$config")
EOF
  ip netns exec "$NS_GW" "$HUBNAT" run --config "$work/hubnat.toml" >"$work/hubnat.log" 2>&1 &
  HUBNAT_PID=$!
  bpids+=("$HUBNAT_PID")
  wait_for 15 "hubnat's TAP device" ip -n "$NS_GW" link show dev "$TAP"
  ip -n "$NS_GW" link set "$TAP" netns "$NS_CL"
  ip -n "$NS_CL" link set "$TAP" up
  ip netns exec "$NS_CL" udhcpc -q -n -f -i "$TAP" -s "$PWD/tests/fixtures/udhcpc-script.sh" -t 10 -T 1 >"$work/udhcpc.log" 2>&1
  ip -n "$NS_CL" route show default | grep -q 'via 192.168.30.1'
  if [ "$config" != none ]; then
    grep -q 'POLICY loaded: .*session_filter=true' "$work/state/security.log" ||
      { echo "bench-policy.sh: $config: no 'POLICY loaded' line with a session filter in the security log" >&2; return 1; }
  fi
  ip netns exec "$NS_CL" python3 "$work/connect.py" "$SERVER_IP" "$PORT" 50 >/dev/null
  ip netns exec "$NS_CL" python3 "$work/connect.py" "$SERVER_IP" "$PORT" "$N"
  kill -0 "$HUBNAT_PID" || { echo "bench-policy.sh: hubnat died during the $config run" >&2; return 1; }
  stop_list bpids
}

# The first hubnat of a run is slower (its binary and the namespaces are cold): one measurement
# without policies, not counted.
echo "warm-up: $N connections, not counted..."
measure none >/dev/null
declare -A results=()
for round in $(seq "$ROUNDS"); do
  for config in "${CONFIGS[@]}"; do
    echo "round $round/$ROUNDS, $config: $N connections..."
    r=$(measure "$config")
    echo "  $r connections/s"
    results[$config]="${results[$config]:-} $r"
  done
done

median() { python3 -c 'import statistics, sys; print("%.0f" % statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

echo
echo "ip netns exec CLIENT python3 connect.py $SERVER_IP $PORT $N: sequential connections, each: connect, 1 byte each way, close"
echo "client namespace -> TAP -> hubnat ($(basename "$(dirname "$HUBNAT")")) -> host socket -> server namespace (python3 one-byte echo)"
echo "cores: $(nproc); kernel: $(uname -r); hubnat: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src backends policies 2>/dev/null || echo '+changes')"
echo
base=$(median ${results[none]})
echo "| policies | connections/s (median) | rounds | ratio to none |"
echo "| --- | ---: | --- | ---: |"
for config in "${CONFIGS[@]}"; do
  m=$(median ${results[$config]})
  ratio=$(python3 -c 'import sys; print("%.2f" % (float(sys.argv[1]) / float(sys.argv[2])))' "$m" "$base")
  echo "| $config | $m | $(echo ${results[$config]} | sed 's/ /, /g') | $ratio |"
done
