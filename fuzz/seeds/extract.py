#!/usr/bin/env python3
"""Extracts the fuzz seed corpora from the captures fuzz/seeds/capture.sh makes.

usage: extract.py HUBNAT_PCAP UPSTREAM_PCAP CORPUS_DIR

- frame/:       whole frames the clients sent (one of each kind per client);
- dhcp/:        each client's DHCP messages (UDP payloads to port 67), one per file, and each
                client's whole exchange, messages joined by the dhcp target's separator;
- dns_answer/:  the UDP payloads dnsmasq answered with (to dig, and to hubnat's forwarder);
- hub_framing/: each client's frames as a hub peer would send them (4-byte big-endian length,
                then the frame), after the target's selector byte;
- config/:      the example configurations (config/*.toml).

Which client: the MAC the capture script gave it (52:54:00:fa:00:01 dhclient, :02 udhcpc,
:03 dhcpcd). Plain Python, no scapy.
"""

import os
import shutil
import struct
import sys

CLIENTS = {
    bytes.fromhex("525400fa0001"): "dhclient",
    bytes.fromhex("525400fa0002"): "udhcpc",
    bytes.fromhex("525400fa0003"): "dhcpcd",
}
OUR_MAC = bytes.fromhex("00ac01020304")
SEPARATOR = b"\xfe\xed\xfa\xce"
DHCP_TYPES = {1: "discover", 2: "offer", 3: "request", 4: "decline", 5: "ack", 6: "nak",
              7: "release", 8: "inform"}


def frames(path):
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    assert linktype == 1, f"{path}: not Ethernet (linktype {linktype})"
    at = 24
    while at + 16 <= len(data):
        _, _, incl, _ = struct.unpack(endian + "IIII", data[at:at + 16])
        yield data[at + 16:at + 16 + incl]
        at += 16 + incl


def ipv4_udp(frame):
    """(src ip, dst ip, sport, dport, payload) of an IPv4/UDP frame, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    total = struct.unpack(">H", frame[16:18])[0]
    ip = frame[14:14 + total]
    udp = ip[ihl:]
    sport, dport, length = struct.unpack(">HHH", udp[:6])
    return ip[12:16], ip[16:20], sport, dport, udp[8:length]


def kind(frame):
    """A short name of what a client's frame is."""
    et = frame[12:14]
    if et == b"\x08\x06":
        return "arp"
    if et != b"\x08\x00":
        return "ethertype-" + et.hex()
    proto = frame[23]
    if proto == 1:
        return "icmp-type%d" % frame[14 + (frame[14] & 0x0F) * 4]
    u = ipv4_udp(frame)
    if u:
        if u[3] == 67:
            return "dhcp-" + dhcp_type(u[4])
        if u[3] == 53:
            return "dns-query"
        return "udp-%d" % u[3]
    if proto == 6:
        ihl = (frame[14] & 0x0F) * 4
        flags = frame[14 + ihl + 13]
        names = [n for bit, n in ((2, "syn"), (16, "ack"), (8, "psh"), (1, "fin"), (4, "rst"))
                 if flags & bit]
        port = struct.unpack(">H", frame[14 + ihl + 2:14 + ihl + 4])[0]
        return "tcp%d-%s" % (port, "-".join(names))
    return "ip-proto%d" % proto


def dhcp_type(body):
    at = 240
    while at + 1 < len(body):
        code = body[at]
        if code == 0:
            at += 1
            continue
        if code == 255:
            break
        length = body[at + 1]
        if code == 53 and length == 1:
            return DHCP_TYPES.get(body[at + 2], "type%d" % body[at + 2])
        at += 2 + length
    return "bootp"


def write(dirname, name, data):
    os.makedirs(dirname, exist_ok=True)
    with open(os.path.join(dirname, name), "wb") as f:
        f.write(data)


def main():
    hubnat_pcap, upstream_pcap, corpus = sys.argv[1:4]
    seen = set()
    exchanges = {}
    streams = {}
    for frame in frames(hubnat_pcap):
        src = frame[6:12]
        client = CLIENTS.get(src)
        if client is None:
            continue
        stream = streams.setdefault(client, bytearray())
        if len(stream) < 2048:
            stream.extend(struct.pack(">I", len(frame)) + frame)
        k = kind(frame)
        u = ipv4_udp(frame)
        if u and u[3] == 67:
            exchanges.setdefault(client, []).append(u[4])
        # One frame of each kind per client (the DHCP ones each: they differ).
        n = 1
        while (client, k, n) in seen:
            n += 1
        if n > 1 and not k.startswith("dhcp"):
            continue
        seen.add((client, k, n))
        write(os.path.join(corpus, "frame"), "%s-%s-%d" % (client, k, n), frame)
    for client, messages in exchanges.items():
        count = {}
        for body in messages:
            t = dhcp_type(body)
            count[t] = count.get(t, 0) + 1
            write(os.path.join(corpus, "dhcp"), "%s-%s-%d" % (client, t, count[t]), body)
        write(os.path.join(corpus, "dhcp"), "%s-exchange" % client, SEPARATOR.join(messages))
    for client, stream in streams.items():
        write(os.path.join(corpus, "hub_framing"), "%s-stream" % client, b"\x40" + bytes(stream))
    answers = set()
    for frame in frames(upstream_pcap):
        u = ipv4_udp(frame)
        if u and u[2] == 53 and len(u[4]) >= 12 and u[4] not in answers:
            answers.add(u[4])
            write(os.path.join(corpus, "dns_answer"), "dnsmasq-%02d" % len(answers), u[4])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name in sorted(os.listdir(os.path.join(root, "config"))):
        if name.endswith(".toml"):
            os.makedirs(os.path.join(corpus, "config"), exist_ok=True)
            shutil.copy(os.path.join(root, "config", name), os.path.join(corpus, "config", name))
    for d in sorted(os.listdir(corpus)):
        print("%-12s %d seeds" % (d, len(os.listdir(os.path.join(corpus, d)))))


if __name__ == "__main__":
    main()
