#!/usr/bin/env bash
# The benchmark suite: hubnat side by side with the kernel, slirp4netns and pasta, in one run.
#
#   scripts/bench.sh                                    # as root; the full suite (about 32 min)
#   ROUNDS=1 DURATION=2 MEASURES="tput rr" scripts/bench.sh          # a quick look
#   CONTENDERS="pasta hubnat-tap" MTUS=65520 scripts/bench.sh
#
# Knobs (environment):
#   ROUNDS=2        rounds; the contenders' order rotates from one round to the next, and the
#                   table gives the median of the rounds
#   DURATION=5      seconds of each iperf3 run, request/response run and connection run
#   MTUS="1500 65520"
#   CONTENDERS="kernel slirp4netns pasta hubnat-tap hubnat-hub"   (hubnat-raw too, on request)
#   MEASURES="tput udp rr conn mem"
#   SESSIONS="1000 10000"   the open idle TCP sessions of the memory measure
#   OUT=target/bench        where the results go (bench-DATE.md, .json, .jsonl); kept
#   HUBNAT=, BRIDGE=        already built binaries (else `cargo build --release` builds them)
#   PROFILE=DIR     profile every measure with `perf record -a -g` (Debian package
#                   linux-perf): DIR/ROUND-MTU-CONTENDER-MEASURE.txt has each process's share
#                   of the machine's CPU, the NAT process's kernel/user split and the functions
#                   on the most of its call stacks (bench_tool.py stacks), .data the record
# It installs nothing: a missing tool is named with its Debian package, and the run stops.
#
# Each (round, MTU, contender) gets namespaces of its own (DESIGN.md safety rules; only
# 10.77.x.y and the segment's 192.168.30.x), made afresh and deleted afterwards:
#   server  10.77.0.2/24 on a veth to the gateway, its only link; runs `iperf3 -s` and
#           scripts/bench_tool.py's servers (TCP echo, one-byte-and-close, UDP echo, hold)
#   gateway 10.77.0.1/24, its only link leads to the server; the NAT runs here, so the NAT's
#           outside is this namespace
#   client  its only route leads through the contender; the clients run here
# The contenders (every link, device and NAT at the MTU under test):
#   kernel       a veth pair gateway 10.77.5.1 <-> client 10.77.5.2, forwarding on, and an
#                nftables masquerade out of the gateway's link (without nft: plain routing,
#                the server routes 10.77.5.0/24 back; the run says which). The upper bound.
#   slirp4netns  `slirp4netns --configure --mtu M --cidr 10.77.3.0/24 --disable-host-loopback`
#                attached to the client namespace, running in the gateway's
#   pasta        `pasta -f --runas 0:0 --config-net -4 -m M -a 10.77.4.2 -n 24 -g 10.77.4.1
#                -D none --no-map-gw -i GATEWAY-LINK -t none -u none -T none -U none
#                --netns CLIENT`, running in the gateway's
#   hubnat-tap   `hubnat run` (release) on a TAP device moved into the client namespace; the
#                client takes its address and route from hubnat's DHCP (udhcpc)
#   hubnat-hub   hubnat on a hub socket (QEMU `-netdev stream` framing); examples/tap_to_hub.rs
#                in the client namespace copies frames between a TAP device and the socket: one
#                more process and one more copy per frame each way, which a VM on the socket
#                pays too but hubnat's TAP backend does not
#   hubnat-raw   a veth pair gateway <-> client; hubnat attaches to the gateway's end (AF_PACKET)
# Before measuring, the client must reach the server's TCP and UDP echo through the contender;
# a contender that does not start or does not reach is recorded with the reason.
# The measures (the client namespace to the server, through the contender):
#   tput  iperf3 TCP, c->s and s->c (-R), 1 stream and 4 (-P 4): the receiver's Gbit/s; the
#         NAT process's CPU seconds (utime+stime from /proc/PID/stat) per GB moved over the
#         four runs (kernel: n/a; hubnat-hub: hubnat's process, the bridge not counted)
#   udp   iperf3 -u -b 0 -l 64, c->s and s->c: datagrams received per second, and the loss
#   rr    one byte back and forth on one TCP connection (TCP_NODELAY) and on one UDP flow,
#         python3 client and server, DURATION s after 200 uncounted: p50 and p99 round trip
#   conn  new TCP connections (connect, one byte each way, the server closes, close) for
#         DURATION s, one at a time and 32 at once (python3): completed per second
#   mem   the NAT process's RSS as started (before any traffic), then (last, after the other
#         measures) before the sessions, with SESSIONS open idle TCP sessions (each carried one
#         byte each way, so it is open end to end) and 5 s after they closed (kernel: n/a);
#         the KiB per session counts from "before the sessions"
# Output: the machine, the date and the git revision, then a markdown table per MTU (rows =
# measures, columns = contenders, and each hubnat contender's ratio to the best of slirp4netns
# and pasta and to the kernel), notes on what could not be measured; OUT/bench-DATE.json has
# every raw sample. Everything it starts is stopped by PID, and its namespaces, devices and
# temporary files are deleted on exit, also on Ctrl-C or an error.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-5}
MTUS=${MTUS:-"1500 65520"}
CONTENDERS=${CONTENDERS:-"kernel slirp4netns pasta hubnat-tap hubnat-hub"}
MEASURES=${MEASURES:-"tput udp rr conn mem"}
SESSIONS=${SESSIONS:-"1000 10000"}
OUT=${OUT:-target/bench}
SERVER_IP=10.77.0.2
IPERF_PORT=5201
PORT=7001   # bench_tool.py serve: 7001 TCP echo, 7002 one byte and close, 7003 UDP echo, 7004 hold
TOOL="$PWD/scripts/bench_tool.py"

die() { echo "bench.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, TAP devices)"
for c in $CONTENDERS; do
  case "$c" in kernel|slirp4netns|pasta|hubnat-tap|hubnat-hub|hubnat-raw) ;;
    *) die "unknown contender '$c' in CONTENDERS (kernel slirp4netns pasta hubnat-tap hubnat-hub hubnat-raw)" ;; esac
done
for m in $MEASURES; do
  case "$m" in tput|udp|rr|conn|mem) ;; *) die "unknown measure '$m' in MEASURES (tput udp rr conn mem)" ;; esac
done
has() { case " $1 " in *" $2 "*) return 0 ;; *) return 1 ;; esac; }
hubnat_wanted() { has "$CONTENDERS" hubnat-tap || has "$CONTENDERS" hubnat-hub || has "$CONTENDERS" hubnat-raw; }

# The tools this run needs, each with its Debian package.
missing=()
need() { command -v "$1" >/dev/null || missing+=("$1 (Debian package $2)"); }
need ip iproute2
need python3 python3
{ has "$MEASURES" tput || has "$MEASURES" udp; } && need iperf3 iperf3
has "$CONTENDERS" slirp4netns && need slirp4netns slirp4netns
has "$CONTENDERS" pasta && need pasta passt
[ -z "${PROFILE:-}" ] || need perf linux-perf
if hubnat_wanted; then need udhcpc udhcpc; [ -n "${HUBNAT:-}" ] || need cargo "cargo, or rustup"; fi
[ "${#missing[@]}" -eq 0 ] || die "missing: ${missing[*]}; install them (apt-get install ...) or leave their contenders out of CONTENDERS"
KERNEL_NAT=nft
if has "$CONTENDERS" kernel && ! command -v nft >/dev/null; then
  KERNEL_NAT=route
  echo "bench.sh: nft not installed (Debian package nftables): the kernel contender routes without NAT"
fi

if hubnat_wanted && [ -z "${HUBNAT:-}" ]; then
  echo "building hubnat and examples/tap_to_hub.rs (release)..."
  cargo build --release --locked --bin hubnat --example tap_to_hub
  target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  HUBNAT="$target_dir/release/hubnat"
  BRIDGE=${BRIDGE:-"$target_dir/release/examples/tap_to_hub"}
fi
if hubnat_wanted; then
  [ -x "$HUBNAT" ] || die "no binary at $HUBNAT"
  if has "$CONTENDERS" hubnat-hub; then [ -x "${BRIDGE:-}" ] || die "no tap_to_hub binary at '${BRIDGE:-}' (set BRIDGE)"; fi
fi

# 10,000 sessions take a descriptor each in the client, the NAT and the server.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

mkdir -p "$OUT"
if [ -n "${PROFILE:-}" ]; then mkdir -p "$PROFILE"; PROFILE=$(cd "$PROFILE" && pwd); fi
stamp=$(date -u +%Y%m%dT%H%M%SZ)
SAMPLES="$OUT/bench-$stamp.jsonl"
: >"$SAMPLES"
work=$(mktemp -d /tmp/hubnat-bench.XXXXXX)
tag=$(( $$ % 100000 ))
NS_SRV="bxsv$tag" NS_GW="bxgw$tag" NS_CL="bxcl$tag"
UP_GW="bxup$tag" UP_SRV="bxsg$tag"          # the gateway <-> server veth pair
TAP="bxtap$tag" HUB_TAP="bxhb$tag"           # hubnat's TAP device; the bridge's
RAW_GW="bxrg$tag" RAW_CL="bxrc$tag"          # hubnat-raw's veth pair
K_GW="bxkg$tag" K_CL="bxkc$tag"              # the kernel contender's veth pair
HUB_SOCK="$work/hub.sock"
pids=()    # the servers: one block
bpids=()   # the contender's processes: one block
NAT_PID=-
WHY=

teardown() {
  stop_list bpids
  stop_list pids
  local ns
  for ns in "$NS_CL" "$NS_GW" "$NS_SRV"; do ip netns del "$ns" 2>/dev/null || true; done
}

cleanup() {
  local rc=$?
  teardown
  rm -rf "$work"
  [ "$rc" -eq 0 ] || echo "bench.sh: stopped (exit $rc); the samples so far are in $SAMPLES" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

veth() { # veth NS_A DEV_A NS_B DEV_B MTU
  ip -n "$1" link add "$2" mtu "$5" type veth peer name "$4" mtu "$5" netns "$3" &&
  ip -n "$1" link set "$2" up &&
  ip -n "$3" link set "$4" up
}
wait_for() { # wait_for SECONDS COMMAND...: 0 once COMMAND succeeds, 1 at the deadline
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}
last_error() { # last_error LOG: a process's last error line, for a note
  local line
  line=$(grep -iE 'error|panick|fail' "$1" 2>/dev/null | tail -n 1 | cut -c1-200)
  [ -n "$line" ] || line=$(tail -n 1 "$1" 2>/dev/null | cut -c1-200)
  echo "${line:-(nothing in its log)}"
}

# The server and gateway namespaces of one block, and the servers.
setup_base() { # setup_base MTU
  local mtu=$1 ns
  for ns in "$NS_SRV" "$NS_GW" "$NS_CL"; do new_ns "$ns"; done
  veth "$NS_GW" "$UP_GW" "$NS_SRV" "$UP_SRV" "$mtu"
  ip -n "$NS_GW" addr add 10.77.0.1/24 dev "$UP_GW"
  ip -n "$NS_SRV" addr add "$SERVER_IP/24" dev "$UP_SRV"
  in_ns "$NS_SRV" sysctl -qw net.core.somaxconn=4096 net.ipv4.tcp_max_syn_backlog=4096
  for ns in "$NS_GW" "$NS_CL"; do
    in_ns "$ns" sysctl -qw net.ipv4.ip_local_port_range="10000 65000" net.ipv4.tcp_tw_reuse=1
  done
  # Started with `ip netns exec` directly (it execs the program), so $! is the server's PID.
  ip netns exec "$NS_SRV" iperf3 -s -B "$SERVER_IP" -p "$IPERF_PORT" >"$work/iperf3-server.log" 2>&1 &
  pids+=($!)
  ip netns exec "$NS_SRV" python3 "$TOOL" serve "$SERVER_IP" "$PORT" >"$work/serve.log" 2>&1 &
  pids+=($!)
  wait_for 10 sh -c "ip netns exec $NS_SRV ss -Hlnt | grep -q '$SERVER_IP:$IPERF_PORT ' &&
                     ip netns exec $NS_SRV ss -Hlnt | grep -q '$SERVER_IP:$((PORT + 3)) '" ||
    die "the servers did not start: $(last_error "$work/serve.log")"
}

hubnat_config() { # hubnat_config MTU BACKEND-SECTION
  cat >"$work/hubnat.toml" <<EOF
[host]
mac = "00:ac:11:22:33:44"
[nat]
mtu = $1
max_sessions = 20000
max_sessions_per_client = 20000
memory_limit = ""
[dns]
upstream = ["$SERVER_IP"]
$2
[state]
dir = "$work/state"
[log]
level = "warn"
EOF
  rm -rf "$work/state"
}

# start_contender CONTENDER MTU: the NAT running and the client namespace routed through it.
# Sets NAT_PID ("-" for the kernel); on failure returns 1 with the reason in WHY. (Called in an
# `if`, so `set -e` does not apply inside: every step is checked.)
start_contender() {
  local c=$1 mtu=$2 dev log="$work/$1.log"
  WHY=''
  NAT_PID=-
  case "$c" in
    kernel)
      veth "$NS_GW" "$K_GW" "$NS_CL" "$K_CL" "$mtu" || { WHY="veth pair at MTU $mtu"; return 1; }
      if ! { ip -n "$NS_GW" addr add 10.77.5.1/24 dev "$K_GW" &&
             ip -n "$NS_CL" addr add 10.77.5.2/24 dev "$K_CL" &&
             ip -n "$NS_CL" route add default via 10.77.5.1 &&
             in_ns "$NS_GW" sysctl -qw net.ipv4.ip_forward=1; }; then
        WHY="addresses, route or forwarding"; return 1
      fi
      if [ "$KERNEL_NAT" = nft ]; then
        in_ns "$NS_GW" nft -f - >"$log" 2>&1 <<EOF || { WHY="nft: $(head -n 1 "$log")"; return 1; }
table ip hubnat_bench {
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "$UP_GW" masquerade
  }
}
EOF
      else
        ip -n "$NS_SRV" route add 10.77.5.0/24 via 10.77.0.1 || { WHY="the server's route back"; return 1; }
      fi
      ;;
    slirp4netns)
      ip netns exec "$NS_GW" slirp4netns --configure --mtu "$mtu" --cidr 10.77.3.0/24 --disable-host-loopback \
        --netns-type=path "/run/netns/$NS_CL" bxsl0 >"$log" 2>&1 &
      NAT_PID=$!; bpids+=("$NAT_PID")
      wait_for 10 sh -c "ip -n $NS_CL route show default | grep -q ." ||
        { WHY="no route from slirp4netns: $(last_error "$log")"; return 1; }
      ;;
    pasta)
      # --runas 0:0: as root pasta drops to nobody first, and then cannot enter the namespace.
      ip netns exec "$NS_GW" pasta -f -q --runas 0:0 --config-net -4 -m "$mtu" -a 10.77.4.2 -n 24 -g 10.77.4.1 \
        -D none --no-map-gw -i "$UP_GW" -t none -u none -T none -U none --netns "/run/netns/$NS_CL" >"$log" 2>&1 &
      NAT_PID=$!; bpids+=("$NAT_PID")
      wait_for 10 sh -c "ip -n $NS_CL route show default | grep -q ." ||
        { WHY="no route from pasta: $(last_error "$log")"; return 1; }
      ;;
    hubnat-*)
      rm -f "$HUB_SOCK"
      case "$c" in
        hubnat-tap) hubnat_config "$mtu" "[backend]
kind = \"tap\"
[backend.tap]
name = \"$TAP\"" ;;
        hubnat-hub) hubnat_config "$mtu" "[backend]
kind = \"hub\"
[backend.hub]
listen = \"unix:$HUB_SOCK\"" ;;
        hubnat-raw)
          veth "$NS_GW" "$RAW_GW" "$NS_CL" "$RAW_CL" "$mtu" || { WHY="veth pair at MTU $mtu"; return 1; }
          hubnat_config "$mtu" "[backend]
kind = \"raw\"
[backend.raw]
interface = \"$RAW_GW\"" ;;
      esac
      ip netns exec "$NS_GW" "$HUBNAT" run --config "$work/hubnat.toml" >"$log" 2>&1 &
      NAT_PID=$!; bpids+=("$NAT_PID")
      case "$c" in
        hubnat-tap)
          wait_for 15 ip -n "$NS_GW" link show dev "$TAP" || { WHY="no TAP device from hubnat: $(last_error "$log")"; return 1; }
          ip -n "$NS_GW" link set "$TAP" netns "$NS_CL" || { WHY="cannot move the TAP device"; return 1; }
          dev=$TAP ;;
        hubnat-hub)
          wait_for 15 test -S "$HUB_SOCK" || { WHY="no hub socket from hubnat: $(last_error "$log")"; return 1; }
          # The bridge runs in the client namespace, so its TAP device is made there; the Unix
          # socket is reached by its path, which no network namespace hides.
          ip netns exec "$NS_CL" "$BRIDGE" "$HUB_TAP" "$HUB_SOCK" >"$work/bridge.log" 2>&1 &
          bpids+=($!)
          wait_for 10 ip -n "$NS_CL" link show dev "$HUB_TAP" ||
            { WHY="no TAP device from tap_to_hub: $(last_error "$work/bridge.log")"; return 1; }
          dev=$HUB_TAP ;;
        hubnat-raw) dev=$RAW_CL ;;
      esac
      ip -n "$NS_CL" link set "$dev" mtu "$mtu" up || { WHY="MTU $mtu on $dev"; return 1; }
      in_ns "$NS_CL" udhcpc -q -n -f -i "$dev" -s "$PWD/tests/fixtures/udhcpc-script.sh" -t 10 -T 1 >"$work/udhcpc.log" 2>&1 ||
        { WHY="no DHCP lease; hubnat: $(last_error "$log")"; return 1; }
      ;;
  esac
}

# `profiled NAME CMD...`: runs CMD; with PROFILE, under `perf record -a -g`, then writes
# PROFILE/NAME.txt: each process's share of the samples, and what the NAT process did.
profiled() {
  local name=$1; shift
  [ -n "${PROFILE:-}" ] || { "$@"; return; }
  local data="$PROFILE/$name.data" perf_pid rc=0
  perf record -q -a -g -F 999 -o "$data" >"$work/perf.log" 2>&1 & perf_pid=$!
  sleep 0.2
  "$@" || rc=$?
  kill -INT "$perf_pid" 2>/dev/null; wait "$perf_pid" 2>/dev/null || true
  ( # `head` closes the pipe early: not an error here
    set +e +o pipefail
    echo "# $name: share of the machine's CPU samples by process (all CPUs; swapper = idle)"
    perf report -i "$data" --no-children --sort comm -g none --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 12
    if [ "$NAT_PID" != - ]; then
      echo; echo "# the NAT process (PID $NAT_PID): the share of its samples whose call stack holds each function"
      python3 "$TOOL" stacks "$data" "$NAT_PID"
    fi
  ) >"$PROFILE/$name.txt"
  return $rc
}

# The measures of one block; every result (or error) goes to $SAMPLES as one JSON line.
measure() { # measure ROUND MTU CONTENDER
  local t=(--out "$SAMPLES" --tag "round=$1" --tag "mtu=$2" --tag "contender=$3") p dir flags idle
  local pre="$1-$2-$3"
  # The NAT as started, before any traffic. The sessions come last: 10,000 of them leave
  # slirp4netns unable to take new connections for a while.
  if [ "$NAT_PID" != - ]; then
    idle=$(awk '/^VmRSS:/ { printf "%.2f", $2 / 1024 }' "/proc/$NAT_PID/status" 2>/dev/null || echo -)
  else
    idle=-
  fi
  if has "$MEASURES" tput; then
    for p in 1 4; do
      for dir in up down; do
        flags=(); [ "$dir" = up ] || flags+=(-R); [ "$p" = 1 ] || flags+=(-P "$p")
        profiled "$pre-tcp_${dir}_$p" python3 "$TOOL" iperf "${t[@]}" --tag "measure=tcp_${dir}_$p" -- \
          "$NS_CL" "$SERVER_IP" "$IPERF_PORT" "$DURATION" "$NAT_PID" "${flags[@]}"
      done
    done
  fi
  if has "$MEASURES" udp; then
    for dir in up down; do
      flags=(-u -b 0 -l 64); [ "$dir" = up ] || flags+=(-R)
      profiled "$pre-udp_$dir" python3 "$TOOL" iperf "${t[@]}" --tag "measure=udp_$dir" -- \
        "$NS_CL" "$SERVER_IP" "$IPERF_PORT" "$DURATION" "$NAT_PID" "${flags[@]}"
    done
  fi
  if has "$MEASURES" rr; then
    for p in tcp udp; do
      profiled "$pre-${p}_rr" in_ns "$NS_CL" python3 "$TOOL" rr "${t[@]}" --tag "measure=${p}_rr" -- "$p" "$SERVER_IP" "$PORT" "$DURATION"
    done
  fi
  if has "$MEASURES" conn; then
    profiled "$pre-conn_seq" in_ns "$NS_CL" python3 "$TOOL" conn "${t[@]}" --tag measure=conn_seq -- "$SERVER_IP" "$PORT" "$DURATION" 1
    profiled "$pre-conn_32" in_ns "$NS_CL" python3 "$TOOL" conn "${t[@]}" --tag measure=conn_32 -- "$SERVER_IP" "$PORT" "$DURATION" 32
  fi
  if has "$MEASURES" mem; then
    in_ns "$NS_CL" python3 "$TOOL" hold "${t[@]}" --tag measure=mem -- "$SERVER_IP" "$PORT" "${SESSIONS// /,}" "$NAT_PID" "${idle:--}"
  fi
}

note() { # note ROUND MTU CONTENDER REASON
  python3 "$TOOL" note --out "$SAMPLES" --tag "round=$1" --tag "mtu=$2" --tag "contender=$3" -- "$4" >/dev/null
  echo "    not measured: $4"
}

rev="$(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src backends 2>/dev/null || echo '+changes')"
[ -n "${target_dir:-}" ] || ! hubnat_wanted || rev="$rev (binary given: $HUBNAT, not built from it here)"
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
machine="$(nproc) cores ($cpu), $(free -g | awk '/^Mem:/ {print $2}') GB, kernel $(uname -r)"
versions="slirp4netns $(slirp4netns --version 2>/dev/null | sed -n 's/^slirp4netns version //p'), passt $(dpkg-query -W -f '${Version}' passt 2>/dev/null || echo '?'), $(iperf3 --version 2>/dev/null | head -n 1 | cut -d' ' -f1-2), $(python3 --version)"
started=$(date -u '+%Y-%m-%d %H:%M UTC')
load0=$(cut -d' ' -f1-3 /proc/loadavg)
echo "machine: $machine; load average $load0"
echo "hubnat $rev; $versions; kernel contender: $KERNEL_NAT"
echo "ROUNDS=$ROUNDS DURATION=$DURATION MTUS=\"$MTUS\" CONTENDERS=\"$CONTENDERS\" MEASURES=\"$MEASURES\" SESSIONS=\"$SESSIONS\""

read -r -a order <<<"$CONTENDERS"
n=${#order[@]}
t0=$(date +%s)
for round in $(seq 1 "$ROUNDS"); do
  for mtu in $MTUS; do
    for i in $(seq 0 $(( n - 1 ))); do
      c=${order[$(( (i + round - 1) % n ))]}
      echo "round $round/$ROUNDS, MTU $mtu, $c ($(( $(date +%s) - t0 )) s)"
      setup_base "$mtu"
      if ! start_contender "$c" "$mtu"; then
        note "$round" "$mtu" "$c" "$WHY"
      elif ! why=$(in_ns "$NS_CL" python3 "$TOOL" probe "$SERVER_IP" "$PORT"); then
        note "$round" "$mtu" "$c" "the client does not reach the server: $why"
      else
        measure "$round" "$mtu" "$c"
        if [ "$NAT_PID" != - ] && ! kill -0 "$NAT_PID" 2>/dev/null; then
          note "$round" "$mtu" "$c" "the NAT process died during the measures: $(last_error "$work/$c.log")"
        fi
      fi
      teardown
    done
  done
done
elapsed=$(( $(date +%s) - t0 ))

{
  echo "Date: $started; took $(( elapsed / 60 )) min $(( elapsed % 60 )) s. Machine: $machine;"
  echo "load average $load0 at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end. hubnat $rev; $versions."
  echo "Kernel contender: veth + $([ "$KERNEL_NAT" = nft ] && echo "nftables masquerade" || echo "plain routing (no nft)")."
  echo "Command: ROUNDS=$ROUNDS DURATION=$DURATION MTUS=\"$MTUS\" CONTENDERS=\"$CONTENDERS\" MEASURES=\"$MEASURES\" SESSIONS=\"$SESSIONS\" scripts/bench.sh"
  echo
  python3 "$TOOL" report "$SAMPLES" "$OUT/bench-$stamp.json" "date=$started" "machine=$machine" "revision=$rev" \
    "versions=$versions" "kernel_nat=$KERNEL_NAT" "rounds=$ROUNDS" "duration=$DURATION" "mtus=$MTUS" \
    "contenders=$CONTENDERS" "measures=$MEASURES" "sessions=$SESSIONS" "seconds=$elapsed"
} >"$OUT/bench-$stamp.md"
echo
cat "$OUT/bench-$stamp.md"
echo "results: $OUT/bench-$stamp.md, $OUT/bench-$stamp.json (every raw sample), $SAMPLES"
