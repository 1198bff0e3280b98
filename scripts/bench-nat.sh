#!/usr/bin/env bash
# iperf3 through hubnat, side by side with a direct kernel route, at MTU 1500 and 65520.
#
#   scripts/bench-nat.sh                 # as root; DURATION=5 MTUS="1500 65520" by default
#   DURATION=10 MTUS=1500 scripts/bench-nat.sh
#
# For each MTU it builds, in namespaces of its own (DESIGN.md safety rules; 10.77.x.y only):
#   server  10.77.0.2/24 (veth to the gateway) and 10.77.1.1/24 (veth to the direct client);
#           runs `iperf3 -s`
#   gateway 10.77.0.1/24, its only link; runs `hubnat run` (release build) on a TAP device
#   client  the TAP device moved in; address and default route from hubnat's DHCP (udhcpc)
#   direct  10.77.1.2/24, default route via 10.77.1.1: the server by plain kernel routing
# and runs `iperf3 -c 10.77.0.2 -t DURATION` and the same with `-R` from the client (through
# hubnat) and from the direct namespace (the baseline). Every veth and the TAP device have the
# MTU under test, and hubnat's nat.mtu too. It prints a table of Gbit/s (the receiver's count)
# and the ratio hubnat/baseline. Everything it starts is stopped by PID and its namespaces and
# files are deleted on exit, also on Ctrl-C or an error.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5}
MTUS=${MTUS:-"1500 65520"}
SERVER_IP=10.77.0.2
PORT=5201

if [ "$(id -u)" -ne 0 ]; then
  echo "bench-nat.sh: needs root (network namespaces, TAP devices)" >&2
  exit 1
fi
for p in ip iperf3 udhcpc python3 cargo; do
  command -v "$p" >/dev/null || { echo "bench-nat.sh: $p is not installed (scripts/test.sh installs the test clients)" >&2; exit 1; }
done

echo "building hubnat (release)..."
cargo build --release --locked --bin hubnat
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
HUBNAT="$target_dir/release/hubnat"
[ -x "$HUBNAT" ] || { echo "bench-nat.sh: no binary at $HUBNAT" >&2; exit 1; }

work=$(mktemp -d /tmp/hubnat-bench.XXXXXX)
tag=$(( $$ % 100000 ))
NS_SRV="hbsv$tag" NS_GW="hbgw$tag" NS_CL="hbcl$tag" NS_DIR="hbdc$tag"
TAP="hbtap$tag"
pids=()

stop_pids() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  pids=()
}

teardown() {
  stop_pids
  local ns
  for ns in "$NS_SRV" "$NS_GW" "$NS_CL" "$NS_DIR"; do
    ip netns del "$ns" 2>/dev/null || true
  done
}

cleanup() {
  local rc=$?
  teardown
  if [ "$rc" -ne 0 ] && [ -f "$work/hubnat.log" ]; then
    echo "---- hubnat.log (last 30 lines) ----" >&2
    tail -n 30 "$work/hubnat.log" >&2 || true
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

veth() { # veth NS_A DEV_A NS_B DEV_B MTU
  ip -n "$1" link add "$2" mtu "$5" type veth peer name "$4" mtu "$5" netns "$3"
  ip -n "$1" link set "$2" up
  ip -n "$3" link set "$4" up
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then echo "bench-nat.sh: timed out waiting for $what" >&2; return 1; fi
    sleep 0.1
  done
}

setup() { # setup MTU
  local mtu=$1
  for ns in "$NS_SRV" "$NS_GW" "$NS_CL" "$NS_DIR"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
  done
  veth "$NS_GW" "hbup$tag" "$NS_SRV" "hbsg$tag" "$mtu"
  ip -n "$NS_GW" addr add 10.77.0.1/24 dev "hbup$tag"
  ip -n "$NS_SRV" addr add "$SERVER_IP/24" dev "hbsg$tag"
  veth "$NS_DIR" "hbdv$tag" "$NS_SRV" "hbsd$tag" "$mtu"
  ip -n "$NS_SRV" addr add 10.77.1.1/24 dev "hbsd$tag"
  ip -n "$NS_DIR" addr add 10.77.1.2/24 dev "hbdv$tag"
  ip -n "$NS_DIR" route add default via 10.77.1.1

  # Started with `ip netns exec` directly (it execs the program), so $! is the server's PID.
  ip netns exec "$NS_SRV" iperf3 -s -B "$SERVER_IP" -p "$PORT" >"$work/iperf3-server.log" 2>&1 &
  pids+=($!)
  wait_for 10 "iperf3 -s" sh -c "ip netns exec $NS_SRV ss -Hlnt | grep -q '$SERVER_IP:$PORT '"

  cat >"$work/hubnat.toml" <<EOF
[host]
mac = "00:ac:11:22:33:44"
[nat]
mtu = $mtu
[dns]
upstream = ["$SERVER_IP"]
[backend]
kind = "tap"
[backend.tap]
name = "$TAP"
[state]
dir = "$work/state-$mtu"
[log]
level = "warn"
EOF
  ip netns exec "$NS_GW" "$HUBNAT" run --config "$work/hubnat.toml" >"$work/hubnat.log" 2>&1 &
  pids+=($!)
  wait_for 15 "hubnat's TAP device" ip -n "$NS_GW" link show dev "$TAP"
  ip -n "$NS_GW" link set "$TAP" netns "$NS_CL"
  ip -n "$NS_CL" link set "$TAP" mtu "$mtu"
  ip -n "$NS_CL" link set "$TAP" up
  # udhcpc -q: get a lease, configure it (address + default route via the router), exit.
  in_ns "$NS_CL" udhcpc -q -n -f -i "$TAP" -s "$PWD/tests/fixtures/udhcpc-script.sh" -t 10 -T 1 >"$work/udhcpc.log" 2>&1
  ip -n "$NS_CL" route show default | grep -q 'via 192.168.30.1' || { echo "bench-nat.sh: no default route after DHCP" >&2; cat "$work/udhcpc.log" >&2; return 1; }
}

# gbps NS [iperf3 args...]: the receiver's Gbit/s, or "failed".
gbps() {
  local ns=$1; shift
  local json="$work/iperf3.json"
  if timeout $(( DURATION + 30 )) ip netns exec "$ns" iperf3 -c "$SERVER_IP" -p "$PORT" -t "$DURATION" --connect-timeout 3000 -J "$@" >"$json" 2>&1; then
    python3 -c 'import json,sys; print("%.2f" % (json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"] / 1e9))' "$json"
  else
    echo failed
  fi
}

ratio() { python3 -c 'import sys
try: print("%.2f" % (float(sys.argv[1]) / float(sys.argv[2])))
except ValueError: print("-")' "$1" "$2"; }

rows=()
for mtu in $MTUS; do
  echo "MTU $mtu: setting up..."
  setup "$mtu"
  for dir in up down; do
    if [ "$dir" = up ]; then flags=(); label="client -> server"; else flags=(-R); label="server -> client (-R)"; fi
    echo "MTU $mtu $label: iperf3 -c $SERVER_IP -t $DURATION ${flags[*]} (through hubnat, then direct)"
    nat=$(gbps "$NS_CL" "${flags[@]}")
    base=$(gbps "$NS_DIR" "${flags[@]}")
    rows+=("$(printf '%-6s %-22s %14s %14s %8s' "$mtu" "$label" "$nat" "$base" "$(ratio "$nat" "$base")")")
  done
  if ! kill -0 "${pids[1]}" 2>/dev/null; then
    echo "bench-nat.sh: hubnat died during the MTU $mtu runs" >&2
    tail -n 30 "$work/hubnat.log" >&2
  fi
  teardown
done

echo
echo "ip netns exec CLIENT iperf3 -c $SERVER_IP -p $PORT -t $DURATION --connect-timeout 3000 -J [-R]"
echo "  (server: iperf3 -s -B $SERVER_IP -p $PORT); TCP, one stream; Gbit/s as counted by the receiver"
echo "hubnat: client namespace -> TAP -> hubnat (release) -> host socket -> server namespace"
echo "direct: baseline namespace -> veth -> server namespace (kernel only)"
echo "cores: $(nproc); kernel: $(uname -r); hubnat: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src backends 2>/dev/null || echo '+changes')"
echo
printf '%-6s %-22s %14s %14s %8s\n' MTU direction "hubnat Gbit/s" "direct Gbit/s" ratio
for r in "${rows[@]}"; do echo "$r"; done
