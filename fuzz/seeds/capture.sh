#!/bin/sh
# Captures the real traffic the seed corpora come from, then extracts the seeds
# (fuzz/seeds/extract.py). Run as root from the repository: fuzz/seeds/capture.sh
#
#  client ns hnfz-cl                gateway ns hnfz-gw                 server ns hnfz-sv
#  dhclient, udhcpc, dhcpcd, ping,  hubnat run (TAP backend, pcap      dnsmasq (DNS only) at
#  dig, a TCP connect  ◀── TAP ──▶  capture of every frame) ◀─ veth ─▶ 10.77.0.2, tcpdump
#
# hubnat has the fuzz fixture's identity (00:ac:01:02:03:04, 192.168.30.1/24, range .10-.200,
# testkit::settings), so the captured frames are addressed as the fuzz targets' host expects.
# Each DHCP client runs with its own MAC on the TAP device and ends with a RELEASE; dhclient
# runs twice (the second time it asks for its old address: INIT-REBOOT), dhcpcd also sends an
# INFORM. dig asks dnsmasq directly (its answers are the dns_answer seeds) and through
# hubnat; both are captured on the server's veth. Only these three namespaces and 10.77.0.0/24 and 192.168.30.0/24 are used; the
# namespaces are deleted at the end (also on failure). Needs: ip, dnsmasq, tcpdump, dig,
# dhclient, udhcpc, dhcpcd (Debian: dhcpcd-base), python3, and target/debug/hubnat (cargo build).
set -eu

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HUBNAT=${HUBNAT:-$ROOT/target/debug/hubnat}
WORK=$(mktemp -d /tmp/hubnat-fuzz-capture.XXXXXX)
CL=hnfz-cl GW=hnfz-gw SV=hnfz-sv TAP=hnfztap0
PIDS=""

cleanup() {
    for p in $PIDS; do kill "$p" 2>/dev/null || true; done
    # Daemons the clients left behind, in these namespaces only.
    for n in $CL $GW $SV; do
        for p in $(ip netns pids "$n" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
    done
    sleep 1
    for n in $CL $GW $SV; do ip netns del "$n" 2>/dev/null || true; done
    rm -rf "/etc/netns/$CL"
}
trap cleanup EXIT INT TERM

for n in $CL $GW $SV; do
    if ip netns list | grep -qw "$n"; then echo "namespace $n exists; remove it first" >&2; exit 1; fi
    ip netns add "$n"
    ip -n "$n" link set lo up
done
# `ip netns exec` mounts this over /etc/resolv.conf, so no client touches the host's.
mkdir -p "/etc/netns/$CL" && : > "/etc/netns/$CL/resolv.conf"

ip link add hnfzgw0 netns $GW type veth peer name hnfzsv0 netns $SV
ip -n $GW addr add 10.77.0.1/24 dev hnfzgw0 && ip -n $GW link set hnfzgw0 up
ip -n $SV addr add 10.77.0.2/24 dev hnfzsv0 && ip -n $SV link set hnfzsv0 up

# The upstream resolver, with records of many types.
ip netns exec $SV dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts \
    --bind-interfaces --listen-address=10.77.0.2 --port=53 --user=root \
    --local=/hubnat.test/ \
    --host-record=files.hubnat.test,10.77.0.2 \
    --host-record=multi.hubnat.test,10.77.0.3 --host-record=multi.hubnat.test,10.77.0.4 \
    --host-record=v6.hubnat.test,fd00::1 \
    --cname=alias.hubnat.test,files.hubnat.test \
    --mx-host=hubnat.test,mail.hubnat.test,10 \
    --txt-record=txt.hubnat.test,"v=spf1 -all","second string" \
    --srv-host=_http._tcp.hubnat.test,files.hubnat.test,8080 \
    --address=/wild.hubnat.test/10.77.0.9 \
    --pid-file="$WORK/dnsmasq.pid" >"$WORK/dnsmasq.log" 2>&1 &
PIDS="$PIDS $!"
ip netns exec $SV tcpdump -i hnfzsv0 -U -w "$WORK/upstream.pcap" port 53 >"$WORK/tcpdump.log" 2>&1 &
PIDS="$PIDS $!"
# A TCP listener for the clients' connections.
ip netns exec $SV python3 -m http.server -b 10.77.0.2 8080 >"$WORK/http.log" 2>&1 &
PIDS="$PIDS $!"
sleep 1

cat >"$WORK/hubnat.toml" <<EOF
[host]
mac = "00:ac:01:02:03:04"
ip = "192.168.30.1"
[dhcp]
domain = "hubnat.test"
[dns]
upstream = ["10.77.0.2"]
[backend]
kind = "tap"
[backend.tap]
name = "$TAP"
[capture]
path = "$WORK/hubnat.pcap"
[state]
dir = "$WORK/state"
[log]
level = "info"
EOF
ip netns exec $GW "$HUBNAT" run --config "$WORK/hubnat.toml" >"$WORK/hubnat.log" 2>&1 &
PIDS="$PIDS $!"
i=0
until ip -n $GW link show $TAP >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -lt 100 ] || { cat "$WORK/hubnat.log"; exit 1; }; sleep 0.1
done
ip -n $GW link set $TAP netns $CL

in_cl() { ip netns exec $CL "$@"; }

# Minimal scripts: set the address and route, touch nothing else on the host.
cat >"$WORK/dhclient-script" <<'EOF'
#!/bin/sh
case "$reason" in
  BOUND|RENEW|REBIND|REBOOT) ip addr replace "$new_ip_address/24" dev "$interface" ;;
  EXPIRE|FAIL|RELEASE|STOP) ip -4 addr flush dev "$interface" ;;
esac
exit 0
EOF
cat >"$WORK/udhcpc-script" <<'EOF'
#!/bin/sh
case "$1" in
  deconfig) ip -4 addr flush dev "$interface" ;;
  bound|renew) ip addr replace "$ip/${mask:-24}" dev "$interface" ;;
esac
[ -z "$EVENTS" ] || echo "$1" >>"$EVENTS"
exit 0
EOF
printf '#!/bin/sh\nexit 0\n' >"$WORK/dhcpcd-script"
chmod +x "$WORK"/*-script
: >"$WORK/dhcpcd.conf"

client_mac() {
    in_cl ip link set $TAP down
    in_cl ip -4 addr flush dev $TAP
    in_cl ip link set $TAP address "$1"
    in_cl ip link set $TAP up
    sleep 1
}

traffic() {
    in_cl ping -c 1 -W 2 192.168.30.1 || true
    in_cl ip route replace default via 192.168.30.1 dev $TAP || true
    in_cl ping -c 1 -W 2 10.77.0.2 || true
    in_cl dig +time=2 +tries=1 @192.168.30.1 files.hubnat.test || true
    in_cl dig +time=2 +tries=1 +tcp @192.168.30.1 multi.hubnat.test || true
    in_cl python3 -c 'import socket; s=socket.create_connection(("10.77.0.2", 8080), 3); s.sendall(b"GET / HTTP/1.0\r\n\r\n"); s.recv(100); s.close()' || true
}

echo "== dhclient (52:54:00:fa:00:01)"
client_mac 52:54:00:fa:00:01
DHC="-sf $WORK/dhclient-script -pf $WORK/dhclient.pid -lf $WORK/dhclient.leases"
# shellcheck disable=SC2086
in_cl dhclient -4 -v -1 $DHC $TAP
traffic
# Stop without a release, then start again: INIT-REBOOT (a REQUEST for the old address).
# shellcheck disable=SC2086
in_cl dhclient -x $DHC $TAP || true
in_cl ip -4 addr flush dev $TAP
# shellcheck disable=SC2086
in_cl dhclient -4 -v -1 $DHC $TAP
# shellcheck disable=SC2086
in_cl dhclient -r $DHC $TAP || true

echo "== udhcpc (52:54:00:fa:00:02)"
client_mac 52:54:00:fa:00:02
: >"$WORK/udhcpc.events"
ip netns exec $CL env EVENTS="$WORK/udhcpc.events" udhcpc -f -i $TAP -s "$WORK/udhcpc-script" -t 5 -T 1 \
    -x hostname:fuzz-udhcpc -O search -O staticroutes -V fuzz-vendor >"$WORK/udhcpc.log" 2>&1 &
UDHCPC=$!
PIDS="$PIDS $UDHCPC"
i=0
until grep -q bound "$WORK/udhcpc.events"; do
    i=$((i + 1)); [ $i -lt 100 ] || { cat "$WORK/udhcpc.log"; exit 1; }; sleep 0.1
done
traffic
kill -USR1 $UDHCPC   # renew
sleep 1
kill -USR2 $UDHCPC   # release
sleep 1
kill $UDHCPC

echo "== dhcpcd (52:54:00:fa:00:03)"
client_mac 52:54:00:fa:00:03
in_cl dhcpcd -4 -f "$WORK/dhcpcd.conf" -c "$WORK/dhcpcd-script" --noipv4ll -h fuzz-dhcpcd \
    -w -t 20 $TAP
traffic
in_cl dhcpcd -4 -f "$WORK/dhcpcd.conf" -k $TAP || true
sleep 2
in_cl dhcpcd -4 -f "$WORK/dhcpcd.conf" -x $TAP 2>/dev/null || true
sleep 1
in_cl ip addr replace 192.168.30.77/24 dev $TAP
in_cl dhcpcd -4 -f "$WORK/dhcpcd.conf" -c "$WORK/dhcpcd-script" --inform=192.168.30.77/24 \
    -1 -t 5 $TAP || true
in_cl dhcpcd -4 -f "$WORK/dhcpcd.conf" -x $TAP 2>/dev/null || true

echo "== dig against dnsmasq"
for q in "files.hubnat.test" "multi.hubnat.test" "alias.hubnat.test" "v6.hubnat.test AAAA" \
    "hubnat.test MX" "txt.hubnat.test TXT" "_http._tcp.hubnat.test SRV" "nothing.hubnat.test" \
    "x.wild.hubnat.test" "files.hubnat.test ANY" "-x 10.77.0.2" "multi.hubnat.test +noedns" \
    "files.hubnat.test +dnssec" "hubnat.test SOA"; do
    # shellcheck disable=SC2086
    ip netns exec $GW dig +time=2 +tries=1 @10.77.0.2 $q >/dev/null || true
done
sleep 2

for p in $PIDS; do kill "$p" 2>/dev/null || true; done
PIDS=""
sleep 1
python3 "$ROOT/fuzz/seeds/extract.py" "$WORK/hubnat.pcap" "$WORK/upstream.pcap" "$ROOT/fuzz/corpus"
echo "captures and logs in $WORK"
