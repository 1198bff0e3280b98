#!/usr/bin/env bash
# A soak run of hubnat (issue 12): mixed load through a release build on its TAP backend for
# DURATION seconds (default 3600), sampling its memory, descriptors, sessions, leases and error
# counters every SAMPLE seconds (default 30).
#
#   scripts/soak.sh                              # as root; one hour
#   DURATION=600 SAMPLE=10 OUT=/tmp/soak scripts/soak.sh
#
# Namespaces of its own (DESIGN.md safety rules; 10.77.x.y and the segment's 192.168.30.x only):
#   server  10.77.0.2/24: HTTP server (tests/fixtures/http_server.py), UDP echo, dnsmasq, iperf3 -s
#   gateway 10.77.0.1/24, its only outside link; runs `hubnat run` (release build, TAP)
#   client  the TAP device; address from hubnat's DHCP (udhcpc), and a macvlan for the churn
# The load, all at once for the whole run:
#   - DHCP churn: tests/fixtures/dhcp_churn.py on a macvlan (random MACs: DISCOVER, REQUEST,
#     renewals, RELEASE), 2 exchanges in flight, 64 clients kept;
#   - short TCP: 4 loops of curl fetching a 64 KiB file, each a new connection;
#   - long TCP: a 5 Mbit/s iperf3 stream both ways in turn, restarted every 5 minutes, and a
#     20 MB download with its SHA-256 checked every minute;
#   - UDP: a UDP echo client (100 datagrams up to 1472 bytes, each checked) in a loop;
#   - DNS: dig @192.168.30.1 for a name dnsmasq holds, in a loop.
# Output in OUT (default a new /tmp/hubnat-soak.XXXXXX, kept): samples.csv (one row per sample),
# load.log (each load's failures), hubnat.log, and summary.txt, which it also prints: the first,
# peak and last of each gauge, the failures per load, and whether hubnat lived to the end.
# Everything it starts is stopped by PID and its namespaces are deleted on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

DURATION=${DURATION:-3600}
SAMPLE=${SAMPLE:-30}
SERVER_IP=10.77.0.2
VHOST_IP=192.168.30.1

if [ "$(id -u)" -ne 0 ]; then
  echo "soak.sh: needs root (network namespaces, TAP devices)" >&2
  exit 1
fi
for p in ip iperf3 udhcpc python3 curl dig dnsmasq sha256sum cargo; do
  command -v "$p" >/dev/null || { echo "soak.sh: $p is not installed (scripts/test.sh installs the test clients)" >&2; exit 1; }
done

echo "building hubnat (release)..."
cargo build --release --locked --bin hubnat
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
HUBNAT="$target_dir/release/hubnat"

OUT=${OUT:-$(mktemp -d /tmp/hubnat-soak.XXXXXX)}
mkdir -p "$OUT"
work=$(mktemp -d /tmp/hubnat-soak-work.XXXXXX)
chmod 755 "$work"
tag=$(( $$ % 100000 ))
NS_SRV="hssv$tag" NS_GW="hsgw$tag" NS_CL="hscl$tag"
TAP="hstap$tag" CHURN="hsch$tag"
pids=()
loads=()
HUBNAT_PID=

cleanup() {
  local rc=$?
  touch "$work/stop"
  stop_list loads
  stop_list pids
  for ns in "$NS_SRV" "$NS_GW" "$NS_CL"; do ip netns del "$ns" 2>/dev/null || true; done
  cp "$work/hubnat.log" "$OUT/hubnat.log" 2>/dev/null || true
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then echo "soak.sh: timed out waiting for $what" >&2; return 1; fi
    sleep 0.1
  done
}

# The server.
for ns in "$NS_SRV" "$NS_GW" "$NS_CL"; do new_ns "$ns"; done
ip -n "$NS_GW" link add "hsup$tag" type veth peer name "hssg$tag" netns "$NS_SRV"
ip -n "$NS_GW" link set "hsup$tag" up
ip -n "$NS_SRV" link set "hssg$tag" up
ip -n "$NS_GW" addr add 10.77.0.1/24 dev "hsup$tag"
ip -n "$NS_SRV" addr add "$SERVER_IP/24" dev "hssg$tag"
mkdir -p "$work/www"
head -c 65536 /dev/urandom >"$work/www/small"
head -c 20000000 /dev/urandom >"$work/www/big"
big_sum=$(sha256sum "$work/www/big" | cut -d' ' -f1)
ip netns exec "$NS_SRV" python3 tests/fixtures/http_server.py --bind "$SERVER_IP" --port 8080 \
  --root "$work/www" --uploads "$work/uploads" >"$work/http.log" 2>&1 &
pids+=($!)
ip netns exec "$NS_SRV" python3 tests/fixtures/udp_echo_server.py --bind "$SERVER_IP" --port 7777 >"$work/echo.log" 2>&1 &
pids+=($!)
ip netns exec "$NS_SRV" dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts \
  --bind-interfaces --listen-address="$SERVER_IP" --port=53 --host-record="files.hubnat.test,$SERVER_IP" \
  --user=root --group=root --pid-file="$work/dnsmasq.pid" --leasefile-ro >"$work/dnsmasq.log" 2>&1 &
pids+=($!)
ip netns exec "$NS_SRV" iperf3 -s -B "$SERVER_IP" -p 5201 >"$work/iperf3-server.log" 2>&1 &
pids+=($!)
wait_for 10 "the servers" sh -c "ip netns exec $NS_SRV ss -Hlnt | grep -q ':8080 ' && ip netns exec $NS_SRV ss -Hlnt | grep -q ':5201 '"

# The gateway.
cat >"$work/hubnat.toml" <<EOF
[host]
mac = "00:ac:11:22:33:44"
[dhcp]
lease = "2m"
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
EOF
ip netns exec "$NS_GW" "$HUBNAT" run --config "$work/hubnat.toml" >"$work/hubnat.log" 2>&1 &
HUBNAT_PID=$!
pids+=("$HUBNAT_PID")
wait_for 15 "hubnat's TAP device" ip -n "$NS_GW" link show dev "$TAP"
ip -n "$NS_GW" link set "$TAP" netns "$NS_CL"
ip -n "$NS_CL" link set "$TAP" up
# udhcpc stays for the whole run and renews the lease (2 minutes long).
ip netns exec "$NS_CL" udhcpc -f -i "$TAP" -s "$PWD/tests/fixtures/udhcpc-script.sh" -t 10 -T 1 >"$work/udhcpc.log" 2>&1 &
pids+=($!)
wait_for 30 "a lease and a default route" sh -c "ip -n $NS_CL route show default | grep -q 'via $VHOST_IP'"
ip -n "$NS_CL" link add link "$TAP" name "$CHURN" address 02:50:00:00:00:01 type macvlan mode bridge
ip -n "$NS_CL" link set "$CHURN" up
sock="$work/state/control.sock"
wait_for 10 "the control socket" test -S "$sock"

# The loads: each a loop in the client namespace, writing one line per failure to load.log.
end=$(( $(date +%s) + DURATION ))
fail() { echo "$(date -u +%FT%TZ) $1: $2" >>"$OUT/load.log"; }
count() { echo "$1" >>"$work/count.$2"; }
: >"$OUT/load.log"

ip netns exec "$NS_CL" python3 tests/fixtures/dhcp_churn.py --dev "$CHURN" --stop "$work/stop" \
  --inflight 2 --keep 64 >"$work/churn.log" 2>&1 &
loads+=($!)
for i in 1 2 3 4; do
  ( while [ "$(date +%s)" -lt "$end" ]; do
      if in_ns "$NS_CL" curl -sS --noproxy '*' --max-time 20 -o /dev/null --fail "http://$SERVER_IP:8080/files/small" 2>"$work/curl$i.err"; then
        count 1 short
      else fail short-tcp "$(tail -n 1 "$work/curl$i.err")"; fi
    done ) &
  loads+=($!)
done
( while [ "$(date +%s)" -lt "$end" ]; do
    if in_ns "$NS_CL" curl -sS --noproxy '*' --max-time 120 --fail -o "$work/big.dl" "http://$SERVER_IP:8080/files/big" 2>"$work/big.err" &&
       [ "$(sha256sum "$work/big.dl" | cut -d' ' -f1)" = "$big_sum" ]; then
      count 1 big
    else fail long-tcp-download "$(tail -n 1 "$work/big.err") (or a SHA-256 mismatch)"; fi
    sleep 60
  done ) &
loads+=($!)
( flip=; while [ "$(date +%s)" -lt "$end" ]; do
    left=$(( end - $(date +%s) )); t=$(( left < 300 ? left : 300 ))
    [ "$t" -gt 0 ] || break
    if in_ns "$NS_CL" iperf3 -c "$SERVER_IP" -p 5201 -b 5M -t "$t" $flip --connect-timeout 5000 >"$work/iperf3.log" 2>&1; then
      count 1 iperf
    else fail long-tcp-iperf3 "$(tail -n 1 "$work/iperf3.log")"; sleep 5; fi
    if [ -z "$flip" ]; then flip=-R; else flip=; fi
  done ) &
loads+=($!)
( while [ "$(date +%s)" -lt "$end" ]; do
    if in_ns "$NS_CL" python3 tests/fixtures/udp_echo_client.py --server "$SERVER_IP:7777" --count 100 --max-size 1472 >"$work/udp.log" 2>&1; then
      count 1 udp
    else fail udp "$(tail -n 1 "$work/udp.log")"; fi
  done ) &
loads+=($!)
( while [ "$(date +%s)" -lt "$end" ]; do
    a=$(in_ns "$NS_CL" dig "@$VHOST_IP" +tries=1 +timeout=5 +short files.hubnat.test 2>&1 || true)
    if [ "$a" = "$SERVER_IP" ]; then count 1 dns; else fail dns "${a:-no answer}"; fi
    sleep 0.2
  done ) &
loads+=($!)

# The samples.
echo "time_s,rss_kib,fds,tcp_sessions,udp_sessions,leases,frames_in,malformed,nat_created_tcp,nat_created_udp,refused_limits,host_send_dropped" >"$OUT/samples.csv"
sample() {
  local t=$1 rss fds
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$HUBNAT_PID/status" 2>/dev/null || echo 0)
  fds=$(ls "/proc/$HUBNAT_PID/fd" 2>/dev/null | wc -l)
  "$HUBNAT" status --json --control "$sock" 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
n = s["nat"]
print(",".join(str(v) for v in [s["sessions"]["tcp"], s["sessions"]["udp"], s["leases"],
    s["counters"]["frames_in"], s["counters"]["malformed"], n["created"][0], n["created"][1],
    n["refused_limits"], n["host_send_dropped"]]))' | sed "s/^/$t,$rss,$fds,/" >>"$OUT/samples.csv" ||
    echo "$t,$rss,$fds,,,,,,,,," >>"$OUT/samples.csv"
}
start=$(date +%s)
echo "soak: $DURATION s of load, a sample every $SAMPLE s, into $OUT"
while [ "$(date +%s)" -lt "$end" ]; do
  kill -0 "$HUBNAT_PID" 2>/dev/null || { fail hubnat "exited: $(tail -n 3 "$work/hubnat.log" | tr '\n' ' ')"; break; }
  sample $(( $(date +%s) - start ))
  tail -n 1 "$OUT/samples.csv"
  sleep "$SAMPLE"
done
touch "$work/stop"
stop_list loads
sleep 3
alive=yes
kill -0 "$HUBNAT_PID" 2>/dev/null || alive=no
[ "$alive" = no ] || sample $(( $(date +%s) - start ))
acks=$(grep -c '^ack ' "$work/churn.log" || true)

python3 - "$OUT/samples.csv" "$OUT/load.log" "$alive" "$DURATION" "$acks" "$work" >"$OUT/summary.txt" <<'EOF'
import csv, os, sys
path, loadlog, alive, duration, acks, work = sys.argv[1:7]
rows = [r for r in csv.DictReader(open(path)) if r["tcp_sessions"]]
print(f"soak: {duration} s, {len(rows)} samples; hubnat alive at the end: {alive}")
print(f"{'gauge':<18}{'first':>12}{'peak':>12}{'last':>12}")
for k in ["rss_kib", "fds", "tcp_sessions", "udp_sessions", "leases"]:
    v = [int(r[k]) for r in rows]
    print(f"{k:<18}{v[0]:>12}{max(v):>12}{v[-1]:>12}")
last = rows[-1]
for k in ["frames_in", "malformed", "nat_created_tcp", "nat_created_udp", "refused_limits", "host_send_dropped"]:
    print(f"{k:<18}{last[k]:>36}")
def n(name):
    p = os.path.join(work, "count." + name)
    return sum(1 for _ in open(p)) if os.path.exists(p) else 0
fails = {}
for line in open(loadlog):
    kind = line.split()[1].rstrip(":")
    fails[kind] = fails.get(kind, 0) + 1
print("load              done      failed")
for name, kind in [("short", "short-tcp"), ("big", "long-tcp-download"), ("iperf", "long-tcp-iperf3"), ("udp", "udp"), ("dns", "dns")]:
    print(f"{kind:<18}{n(name):>6}{fails.get(kind, 0):>12}")
print(f"{'dhcp-churn acks':<18}{acks:>6}")
if fails.get("hubnat"):
    print("hubnat exited during the run (load.log)")
EOF
cat "$OUT/summary.txt"
echo "samples: $OUT/samples.csv; failures: $OUT/load.log"
