#!/usr/bin/env bash
# iperf3 through hubnat on each of its frame backends (tap, raw, hub), side by side with a
# direct kernel route, at MTU 1500 and 65520.
#
#   scripts/bench-nat.sh                 # as root; DURATION=5 MTUS="1500 65520" BACKENDS="tap raw hub"
#   DURATION=10 MTUS=1500 BACKENDS="tap hub" scripts/bench-nat.sh
#
# For each MTU it builds, in namespaces of its own (DESIGN.md safety rules; 10.77.x.y and the
# segment's 192.168.30.x only):
#   server  10.77.0.2/24 (veth to the gateway) and 10.77.1.1/24 (veth to the direct client);
#           runs `iperf3 -s`
#   gateway 10.77.0.1/24, its only outside link; runs `hubnat run` (release build)
#   direct  10.77.1.2/24, default route via 10.77.1.1: the server by plain kernel routing
#   client  the client end of the segment; address and default route from hubnat's DHCP (udhcpc)
# and, one backend after the other (hubnat restarted, the client namespace made afresh):
#   tap  hubnat opens a TAP device in the gateway namespace; it is moved into the client namespace.
#   raw  a veth pair gateway <-> client; hubnat attaches to the gateway's end (AF_PACKET,
#        `[backend] kind = "raw"`). The client's veth keeps its offloads on: hubnat's raw
#        backend finishes partial checksums and cuts TSO super-frames itself.
#   hub  hubnat listens on a Unix socket (`[backend] kind = "hub"`, QEMU `-netdev stream`
#        framing); examples/tap_to_hub.rs, run in the client namespace, creates a TAP device
#        there and copies frames between it and the socket. So the hub figure includes that
#        bridge: one more process and one more copy of every frame in each direction
#        (TAP -> bridge -> socket -> hubnat's hub thread -> hubnat), which hubnat's own TAP
#        backend does not pay. It is the cost of a segment reached over a hub socket from a
#        kernel stack, not of the hub backend alone (a VM with -netdev stream pays it too).
# It runs `iperf3 -c 10.77.0.2 -t DURATION` and the same with `-R`, from the client (through
# hubnat) for each backend, and from the direct namespace once per MTU (the baseline). Every
# veth and TAP device has the MTU under test, and hubnat's nat.mtu too. It prints one table:
# a row per (MTU, direction, backend) with Gbit/s (the receiver's count), the baseline, and the
# ratio hubnat/baseline; a cell that could not be measured says why under the table.
# Everything it starts is stopped by PID and its namespaces and files are deleted on exit, also
# on Ctrl-C or an error.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

DURATION=${DURATION:-5}
MTUS=${MTUS:-"1500 65520"}
BACKENDS=${BACKENDS:-"tap raw hub"}
SERVER_IP=10.77.0.2
PORT=5201

if [ "$(id -u)" -ne 0 ]; then
  echo "bench-nat.sh: needs root (network namespaces, TAP devices)" >&2
  exit 1
fi
for b in $BACKENDS; do
  case "$b" in tap|raw|hub) ;; *) echo "bench-nat.sh: unknown backend '$b' in BACKENDS (tap, raw, hub)" >&2; exit 1 ;; esac
done
for p in ip iperf3 udhcpc python3 cargo; do
  command -v "$p" >/dev/null || { echo "bench-nat.sh: $p is not installed (scripts/test.sh installs the test clients)" >&2; exit 1; }
done

echo "building hubnat and examples/tap_to_hub.rs (release)..."
cargo build --release --locked --bin hubnat --example tap_to_hub
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
HUBNAT="$target_dir/release/hubnat"
BRIDGE="$target_dir/release/examples/tap_to_hub"
[ -x "$HUBNAT" ] || { echo "bench-nat.sh: no binary at $HUBNAT" >&2; exit 1; }
[ -x "$BRIDGE" ] || { echo "bench-nat.sh: no binary at $BRIDGE" >&2; exit 1; }

work=$(mktemp -d /tmp/hubnat-bench.XXXXXX)
tag=$(( $$ % 100000 ))
NS_SRV="hbsv$tag" NS_GW="hbgw$tag" NS_CL="hbcl$tag" NS_DIR="hbdc$tag"
TAP="hbtap$tag"                  # tap: hubnat's TAP device
RAW_GW="hbrg$tag" RAW_CL="hbrc$tag"  # raw: the veth pair, gateway end and client end
HUB_TAP="hbhb$tag"               # hub: the bridge's TAP device
HUB_SOCK="$work/hub.sock"
pids=()    # iperf3 -s: lives as long as an MTU's namespaces
bpids=()   # hubnat and the bridge: live as long as one backend's runs
HUBNAT_PID=
CLIENT_DEV=
WHY=


teardown() {
  stop_list bpids
  stop_list pids
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
  ip -n "$1" link add "$2" mtu "$5" type veth peer name "$4" mtu "$5" netns "$3" &&
  ip -n "$1" link set "$2" up &&
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

new_ns() { ip netns add "$1" && ip -n "$1" link set lo up; }

# The namespaces of one MTU, the direct path and the iperf3 server (the client namespace is
# made per backend by start_backend).
setup_base() { # setup_base MTU
  local mtu=$1
  for ns in "$NS_SRV" "$NS_GW" "$NS_DIR"; do new_ns "$ns"; done
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
}

# Why hubnat (or the bridge) is not serving: its last error line, if it left one.
last_error() { # last_error LOG
  local line
  line=$(grep -iE 'error|panick' "$1" 2>/dev/null | tail -n 1 | cut -c1-200)
  [ -n "$line" ] || line=$(tail -n 1 "$1" 2>/dev/null | cut -c1-200)
  echo "${line:-(nothing in its log)}"
}

# start_backend BACKEND MTU: a fresh client namespace, hubnat on BACKEND, the client's lease.
# Sets CLIENT_DEV and HUBNAT_PID; on failure returns 1 with the reason in WHY. (Called in an
# `if`, so `set -e` does not apply inside: every step is checked.)
start_backend() {
  local backend=$1 mtu=$2 section
  WHY=
  ip netns del "$NS_CL" 2>/dev/null || true
  new_ns "$NS_CL" || { WHY="cannot create the client namespace"; return 1; }
  rm -f "$HUB_SOCK"
  case "$backend" in
    tap) section="[backend]
kind = \"tap\"
[backend.tap]
name = \"$TAP\"" ;;
    raw)
      veth "$NS_GW" "$RAW_GW" "$NS_CL" "$RAW_CL" "$mtu" 2>"$work/veth.err" ||
        { WHY="veth pair at MTU $mtu: $(head -n 1 "$work/veth.err")"; return 1; }
      section="[backend]
kind = \"raw\"
[backend.raw]
interface = \"$RAW_GW\"" ;;
    hub) section="[backend]
kind = \"hub\"
[backend.hub]
listen = \"unix:$HUB_SOCK\"" ;;
  esac
  cat >"$work/hubnat.toml" <<EOF
[host]
mac = "00:ac:11:22:33:44"
[nat]
mtu = $mtu
[dns]
upstream = ["$SERVER_IP"]
$section
[state]
dir = "$work/state-$mtu-$backend"
[log]
level = "warn"
EOF
  ip netns exec "$NS_GW" "$HUBNAT" run --config "$work/hubnat.toml" >"$work/hubnat.log" 2>&1 &
  HUBNAT_PID=$!
  bpids+=("$HUBNAT_PID")

  case "$backend" in
    tap)
      wait_for 15 "hubnat's TAP device" ip -n "$NS_GW" link show dev "$TAP" ||
        { WHY="no TAP device from hubnat: $(last_error "$work/hubnat.log")"; return 1; }
      CLIENT_DEV=$TAP
      ip -n "$NS_GW" link set "$TAP" netns "$NS_CL" || { WHY="cannot move the TAP device"; return 1; }
      ;;
    raw)
      CLIENT_DEV=$RAW_CL ;;
    hub)
      wait_for 15 "hubnat's hub socket" test -S "$HUB_SOCK" ||
        { WHY="no hub socket from hubnat: $(last_error "$work/hubnat.log")"; return 1; }
      # The bridge runs in the client namespace, so its TAP device is created there; the Unix
      # socket is reached by its path, which no network namespace hides.
      ip netns exec "$NS_CL" "$BRIDGE" "$HUB_TAP" "$HUB_SOCK" >"$work/bridge.log" 2>&1 &
      bpids+=($!)
      wait_for 10 "the bridge's TAP device" ip -n "$NS_CL" link show dev "$HUB_TAP" ||
        { WHY="no TAP device from tap_to_hub: $(last_error "$work/bridge.log")"; return 1; }
      CLIENT_DEV=$HUB_TAP
      ;;
  esac
  ip -n "$NS_CL" link set "$CLIENT_DEV" mtu "$mtu" 2>"$work/mtu.err" ||
    { WHY="MTU $mtu on $CLIENT_DEV: $(head -n 1 "$work/mtu.err")"; return 1; }
  ip -n "$NS_CL" link set "$CLIENT_DEV" up || { WHY="cannot bring $CLIENT_DEV up"; return 1; }
  # udhcpc -q: get a lease, configure it (address + default route via the router), exit. Up
  # to 10 DISCOVERs 1 s apart, which also covers hubnat still attaching (raw).
  in_ns "$NS_CL" udhcpc -q -n -f -i "$CLIENT_DEV" -s "$PWD/tests/fixtures/udhcpc-script.sh" -t 10 -T 1 >"$work/udhcpc.log" 2>&1 ||
    { WHY="no DHCP lease; hubnat: $(last_error "$work/hubnat.log")$([ "$backend" != hub ] || echo "; tap_to_hub: $(last_error "$work/bridge.log")")"; return 1; }
  ip -n "$NS_CL" route show default | grep -q 'via 192.168.30.1' ||
    { WHY="no default route via 192.168.30.1 after DHCP"; return 1; }
}

# gbps NS [iperf3 args...]: the receiver's Gbit/s, or "failed|REASON".
gbps() {
  local ns=$1; shift
  local json="$work/iperf3.json" rc=0
  timeout $(( DURATION + 30 )) ip netns exec "$ns" iperf3 -c "$SERVER_IP" -p "$PORT" -t "$DURATION" --connect-timeout 3000 -J "$@" >"$json" 2>&1 || rc=$?
  python3 - "$json" "$rc" <<'EOF'
import json, sys
path, rc = sys.argv[1], sys.argv[2]
text = open(path).read()
try:
    j = json.loads(text)
except ValueError:
    lines = text.strip().splitlines()
    print("failed|iperf3 (exit %s%s): %s" % (rc, ", timed out" if rc == "124" else "", (lines[-1] if lines else "no output")[:160]))
    sys.exit()
if j.get("error"):
    print("failed|iperf3: %s" % str(j["error"])[:160])
    sys.exit()
try:
    print("%.2f" % (j["end"]["sum_received"]["bits_per_second"] / 1e9))
except (KeyError, TypeError):
    print("failed|iperf3 (exit %s): no result in its output" % rc)
EOF
}

ratio() { python3 -c 'import sys
try: print("%.2f" % (float(sys.argv[1]) / float(sys.argv[2])))
except ValueError: print("-")' "$1" "$2"; }

rows=()
notes=()
row() { rows+=("$(printf '%-6s %-22s %-8s %14s %14s %8s' "$@")"); }

for mtu in $MTUS; do
  echo "MTU $mtu: setting up..."
  setup_base "$mtu"
  declare -A base=()
  for dir in up down; do
    if [ "$dir" = up ]; then flags=(); label="client -> server"; else flags=(-R); label="server -> client (-R)"; fi
    echo "MTU $mtu $label: iperf3 -c $SERVER_IP -t $DURATION ${flags[*]} (direct)"
    r=$(gbps "$NS_DIR" "${flags[@]}")
    base[$dir]=${r%%|*}
    [ "$r" = "${r#*|}" ] || notes+=("MTU $mtu direct $dir: ${r#*|}")
  done
  for backend in $BACKENDS; do
    echo "MTU $mtu $backend: starting hubnat, DHCP..."
    if start_backend "$backend" "$mtu"; then
      ok=1
    else
      ok=0
      notes+=("MTU $mtu $backend: not measured: $WHY")
    fi
    for dir in up down; do
      if [ "$dir" = up ]; then flags=(); label="client -> server"; else flags=(-R); label="server -> client (-R)"; fi
      if [ "$ok" = 1 ]; then
        echo "MTU $mtu $backend $label: iperf3 -c $SERVER_IP -t $DURATION ${flags[*]} (through hubnat)"
        r=$(gbps "$NS_CL" "${flags[@]}")
        nat=${r%%|*}
        [ "$r" = "${r#*|}" ] || notes+=("MTU $mtu $backend $dir: ${r#*|}")
      else
        nat=n/a
      fi
      row "$mtu" "$label" "$backend" "$nat" "${base[$dir]}" "$(ratio "$nat" "${base[$dir]}")"
    done
    if [ "$ok" = 1 ] && ! kill -0 "$HUBNAT_PID" 2>/dev/null; then
      notes+=("MTU $mtu $backend: hubnat died during the runs: $(last_error "$work/hubnat.log")")
      echo "bench-nat.sh: hubnat died during the MTU $mtu $backend runs" >&2
      tail -n 30 "$work/hubnat.log" >&2
    fi
    stop_list bpids
  done
  unset base
  teardown
done

echo
echo "ip netns exec CLIENT iperf3 -c $SERVER_IP -p $PORT -t $DURATION --connect-timeout 3000 -J [-R]"
echo "  (server: iperf3 -s -B $SERVER_IP -p $PORT); TCP, one stream; Gbit/s as counted by the receiver"
echo "tap:    client namespace -> TAP -> hubnat (release) -> host socket -> server namespace"
echo "raw:    client namespace -> veth (offloads on) -> AF_PACKET -> hubnat -> host socket -> server namespace"
echo "hub:    client namespace -> TAP -> tap_to_hub bridge -> Unix socket -> hubnat -> host socket -> server (bridge's extra hop and copy included)"
echo "direct: baseline namespace -> veth -> server namespace (kernel only)"
echo "cores: $(nproc); kernel: $(uname -r); hubnat: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src backends 2>/dev/null || echo '+changes')"
echo
printf '%-6s %-22s %-8s %14s %14s %8s\n' MTU direction backend "hubnat Gbit/s" "direct Gbit/s" ratio
# By MTU, then direction, then backend (each in the order given).
for mtu in $MTUS; do
  for label in "client -> server" "server -> client (-R)"; do
    for r in "${rows[@]}"; do
      case "$r" in "$(printf '%-6s %-22s' "$mtu" "$label")"*) echo "$r" ;; esac
    done
  done
done
if [ "${#notes[@]}" -gt 0 ]; then
  echo
  for n in "${notes[@]}"; do echo "note: $n"; done
fi
