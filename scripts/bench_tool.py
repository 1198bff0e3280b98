#!/usr/bin/env python3
"""The servers, clients and report of scripts/bench.sh (python3, standard library only).

    bench_tool.py serve IP PORT               TCP echo (PORT), one-byte close (PORT+1), UDP echo
                                              (PORT+2), hold (PORT+3); runs until killed
    bench_tool.py probe IP PORT               exit 0 when TCP and UDP echo both answer
    bench_tool.py iperf  --out F --tag k=v .. -- NS IP IPERF3-PORT DURATION PID|- [iperf3 flags]
    bench_tool.py rr     --out F --tag k=v .. -- tcp|udp IP PORT DURATION
    bench_tool.py conn   --out F --tag k=v .. -- IP PORT DURATION CONCURRENCY
    bench_tool.py hold   --out F --tag k=v .. -- IP PORT STEPS(1000,10000) PID|- IDLE-MB|-
    bench_tool.py note   --out F --tag k=v .. -- REASON
    bench_tool.py report SAMPLES.jsonl OUT.json [META k=v ...]
    bench_tool.py stacks PERF.data PID        the process's share of a `perf record -a -g`,
                                              its kernel/user split, and the functions on the
                                              most of its call stacks

Each measuring command appends one JSON object (its tags, the measure's raw results, or
"error") to the samples file F and prints one line for the person watching. `report` takes the
medians over rounds and prints the markdown tables; OUT.json gets every raw sample as well.
"""

import errno
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# servers

def serve(ip, port):
    """Four servers on IP: PORT echoes TCP (a thread per connection, TCP_NODELAY), PORT+1
    answers one byte and closes (the server closes first, so the client's ports do not linger
    in TIME_WAIT), PORT+2 echoes UDP, PORT+3 accepts and holds connections, echoing what
    arrives, and closes on EOF."""
    def listener(p):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, p))
        s.listen(4096)
        return s

    def echo_conn(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                c.sendall(d)
        except OSError:
            pass
        c.close()

    def echo_tcp(s):
        while True:
            c, _ = s.accept()
            threading.Thread(target=echo_conn, args=(c,), daemon=True).start()

    def udp_echo(u):
        while True:
            d, a = u.recvfrom(65536)
            u.sendto(d, a)

    def event_loop(s, hold):
        # One selector loop: accept everything pending, then per connection either answer one
        # byte and close (hold=False) or echo and keep it open until EOF (hold=True).
        s.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(s, selectors.EVENT_READ, None)
        while True:
            for key, _ in sel.select():
                if key.data is None:
                    while True:
                        try:
                            c, _ = s.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:
                            time.sleep(0.01)  # out of descriptors: let closes catch up
                            break
                        c.setblocking(False)
                        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        sel.register(c, selectors.EVENT_READ, 1)
                    continue
                c = key.fileobj
                try:
                    d = c.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    d = b""
                if d and hold:
                    try:
                        c.send(d)
                    except OSError:
                        pass
                    continue
                if d:
                    try:
                        c.send(d[:1])
                    except OSError:
                        pass
                sel.unregister(c)
                c.close()

    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind((ip, port + 2))
    threads = [
        threading.Thread(target=echo_tcp, args=(listener(port),), daemon=True),
        threading.Thread(target=event_loop, args=(listener(port + 1), False), daemon=True),
        threading.Thread(target=udp_echo, args=(u,), daemon=True),
        threading.Thread(target=event_loop, args=(listener(port + 3), True), daemon=True),
    ]
    for t in threads:
        t.start()
    print("serving", flush=True)
    while True:
        time.sleep(3600)


def probe(ip, port):
    try:
        with socket.create_connection((ip, port), timeout=3) as c:
            c.sendall(b"p")
            if c.recv(1) != b"p":
                return "TCP echo: no answer"
    except OSError as e:
        return "TCP to %s:%d: %s" % (ip, port, e)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(1)
    for _ in range(3):
        try:
            u.sendto(b"p", (ip, port + 2))
            if u.recv(16) == b"p":
                return None
        except OSError:
            pass
    return "UDP echo to %s:%d: no answer in 3 tries" % (ip, port + 2)


# ---------------------------------------------------------------------------------------------
# measures

def cpu_ticks(pid):
    """utime + stime of a process (all its threads), in seconds; None without a process."""
    if pid in (None, "-"):
        return None
    try:
        with open("/proc/%s/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def rss_mb(pid):
    if pid in (None, "-"):
        return None
    try:
        with open("/proc/%s/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def iperf(ns, ip, port, duration, flags, pid):
    """iperf3 from namespace NS; the receiver's count, and the NAT process's CPU seconds."""
    cmd = ["ip", "netns", "exec", ns, "iperf3", "-c", ip, "-p", str(port), "-t", str(duration),
           "--connect-timeout", "3000", "-J"] + flags
    c0 = cpu_ticks(pid)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=int(duration) + 30)
        out, rc = p.stdout, p.returncode
    except subprocess.TimeoutExpired:
        return {"error": "iperf3 timed out"}
    c1 = cpu_ticks(pid)
    try:
        j = json.loads(out)
    except ValueError:
        lines = (out + p.stderr).strip().splitlines()
        return {"error": "iperf3 (exit %d): %s" % (rc, (lines[-1] if lines else "no output")[:160])}
    if j.get("error"):
        return {"error": "iperf3: %s" % str(j["error"])[:160]}
    end = j.get("end", {})
    r = {"cmd": " ".join(cmd[4:])}
    if c0 is not None and c1 is not None:
        r["nat_cpu_s"] = round(c1 - c0, 3)
    if "-u" in flags:
        s = end.get("sum_received") or end.get("sum") or {}
        secs = s.get("seconds") or float(duration)
        packets, lost = s.get("packets"), s.get("lost_packets")
        if packets is None or lost is None:
            return {"error": "iperf3: no UDP packet counts in its output"}
        r.update(packets=packets, lost=lost, seconds=secs,
                 kpps=round((packets - lost) / secs / 1000, 2),
                 loss_pct=round(100.0 * lost / packets, 2) if packets else 0.0)
        sent = end.get("sum_sent") or {}
        if sent.get("packets"):
            r["sent_kpps"] = round(sent["packets"] / (sent.get("seconds") or secs) / 1000, 2)
    else:
        s = end.get("sum_received") or {}
        if "bits_per_second" not in s:
            return {"error": "iperf3: no result in its output"}
        r.update(gbps=round(s["bits_per_second"] / 1e9, 3), bytes=s.get("bytes"),
                 seconds=s.get("seconds"))
        if "nat_cpu_s" in r and s.get("bytes"):
            r["cpu_s_per_gb"] = round(r["nat_cpu_s"] / (s["bytes"] / 1e9), 3)
    return r


def percentiles(samples_ns):
    s = sorted(samples_ns)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] / 1000
    return {"n": len(s), "p50_us": round(pick(0.50), 1), "p99_us": round(pick(0.99), 1),
            "min_us": round(s[0] / 1000, 1), "max_us": round(s[-1] / 1000, 1)}


def rr(proto, ip, port, duration):
    """One-byte ping-pong on one connection (TCP, TCP_NODELAY) or one UDP flow, for DURATION
    seconds after 200 uncounted exchanges; the round-trip times' percentiles."""
    duration = float(duration)
    try:
        if proto == "tcp":
            s = socket.create_connection((ip, port), timeout=3)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect((ip, port + 2))
        s.settimeout(1 if proto == "tcp" else 0.2)
    except OSError as e:
        return {"error": "connect: %s" % e}
    lost, times = 0, []
    clock = time.perf_counter_ns
    warm = 200
    deadline = time.monotonic() + duration + 1e9  # set after the warm-up
    i = 0
    while time.monotonic() < deadline:
        t0 = clock()
        try:
            s.send(b"x")
            d = s.recv(16)
        except socket.timeout:
            lost += 1
            if proto == "tcp" or lost > 50:
                return {"error": "%d requests got no answer in time" % lost}
            continue
        except OSError as e:
            return {"error": "exchange: %s" % e}
        t1 = clock()
        if not d:
            return {"error": "the server closed the connection"}
        i += 1
        if i == warm:
            deadline = time.monotonic() + duration
        elif i > warm:
            times.append(t1 - t0)
    s.close()
    if not times:
        return {"error": "no exchange"}
    r = percentiles(times)
    r["lost"] = lost
    return r


def conn(ip, port, duration, concurrency):
    """New TCP connections for DURATION seconds: connect, send one byte, read it and the
    server's FIN, close; CONCURRENCY of them in flight. Completed connections per second."""
    duration, concurrency = float(duration), int(concurrency)
    addr = (ip, port + 1)
    done = errors = 0
    first_error = None
    t_start = time.monotonic()
    deadline = t_start + duration
    if concurrency == 1:
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(addr, timeout=3) as c:
                    c.sendall(b"c")
                    while c.recv(16):
                        pass
                done += 1
            except OSError as e:
                errors += 1
                first_error = first_error or str(e)
                if errors > 1000:
                    break
        elapsed = time.monotonic() - t_start
        return {"done": done, "errors": errors, "first_error": first_error, "seconds": round(elapsed, 3),
                "per_s": round(done / elapsed, 1)}

    sel = selectors.DefaultSelector()
    started = {}  # socket -> start time

    def launch():
        c = socket.socket()
        c.setblocking(False)
        try:
            rc = c.connect_ex(addr)
        except OSError as e:
            c.close()
            return str(e)
        if rc not in (0, errno.EINPROGRESS):
            c.close()
            return os.strerror(rc)
        sel.register(c, selectors.EVENT_WRITE, "connecting")
        started[c] = time.monotonic()
        return None

    def finish(c):
        sel.unregister(c)
        del started[c]
        c.close()

    while time.monotonic() < deadline:
        while len(started) < concurrency:
            e = launch()
            if e:
                errors += 1
                first_error = first_error or e
                time.sleep(0.001)
                break
        for key, _ in sel.select(timeout=0.2):
            c = key.fileobj
            if key.data == "connecting":
                err = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    errors += 1
                    first_error = first_error or os.strerror(err)
                    finish(c)
                    continue
                try:
                    c.send(b"c")
                except OSError as e:
                    errors += 1
                    first_error = first_error or str(e)
                    finish(c)
                    continue
                sel.modify(c, selectors.EVENT_READ, "reading")
            else:
                try:
                    d = c.recv(16)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:
                    errors += 1
                    first_error = first_error or str(e)
                    finish(c)
                    continue
                if not d:
                    done += 1
                    finish(c)
        now = time.monotonic()
        for c, t in list(started.items()):
            if now - t > 3:
                errors += 1
                first_error = first_error or "no answer within 3 s"
                finish(c)
        if errors > 1000:
            break
    elapsed = time.monotonic() - t_start
    for c in list(started):
        finish(c)
    return {"done": done, "errors": errors, "first_error": first_error, "seconds": round(elapsed, 3),
            "per_s": round(done / elapsed, 1), "concurrency": concurrency}


def hold(ip, port, steps, pid, idle):
    """The NAT process's resident memory before, with each number of open idle TCP sessions in
    STEPS (each connection sends one byte and gets it back through the hold server, so it is
    open end to end), and 5 s after they all closed. Up to 256 handshakes in flight. IDLE is
    the RSS the caller took when the NAT had just started, passed through to the report."""
    addr = (ip, port + 3)
    steps = [int(x) for x in steps.split(",")]
    r = {"idle_mb": None if idle == "-" else float(idle), "before_mb": rss_mb(pid), "steps": {}}
    open_socks, pending = [], {}
    sel = selectors.DefaultSelector()
    failures = 0
    first_error = None
    for target in steps:
        t_step = time.monotonic()
        while len(open_socks) < target and time.monotonic() - t_step < 120:
            while len(pending) < 256 and len(open_socks) + len(pending) < target:
                c = socket.socket()
                c.setblocking(False)
                try:
                    rc = c.connect_ex(addr)
                except OSError as e:
                    c.close()
                    failures += 1
                    first_error = first_error or str(e)
                    break
                if rc not in (0, errno.EINPROGRESS):
                    c.close()
                    failures += 1
                    first_error = first_error or os.strerror(rc)
                    break
                sel.register(c, selectors.EVENT_WRITE, "connecting")
                pending[c] = time.monotonic()
            for key, _ in sel.select(timeout=0.2):
                c = key.fileobj
                ok = True
                if key.data == "connecting":
                    err = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        ok, why = False, os.strerror(err)
                    else:
                        try:
                            c.send(b"h")
                            sel.modify(c, selectors.EVENT_READ, "waiting")
                            continue
                        except OSError as e:
                            ok, why = False, str(e)
                else:
                    try:
                        d = c.recv(16)
                        if d:
                            sel.unregister(c)
                            del pending[c]
                            open_socks.append(c)
                            continue
                        ok, why = False, "closed by the far end"
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as e:
                        ok, why = False, str(e)
                if not ok:
                    failures += 1
                    first_error = first_error or why
                    sel.unregister(c)
                    del pending[c]
                    c.close()
            now = time.monotonic()
            for c, t in list(pending.items()):
                if now - t > 5:
                    failures += 1
                    first_error = first_error or "no answer within 5 s"
                    sel.unregister(c)
                    del pending[c]
                    c.close()
            if failures > max(500, target // 5):
                break
        for c in list(pending):
            sel.unregister(c)
            c.close()
        pending.clear()
        time.sleep(3)
        r["steps"][str(target)] = {"opened": len(open_socks), "rss_mb": rss_mb(pid),
                                   "seconds": round(time.monotonic() - t_step, 1)}
    for c in open_socks:
        c.close()
    time.sleep(5)
    r["after_close_mb"] = rss_mb(pid)
    r["failures"] = failures
    r["first_error"] = first_error
    return r


# ---------------------------------------------------------------------------------------------
# the report

CONTENDERS = ["kernel", "slirp4netns", "pasta", "hubnat-tap", "hubnat-hub", "hubnat-raw"]
PEERS = ["slirp4netns", "pasta"]
OURS = ["hubnat-tap", "hubnat-hub", "hubnat-raw"]

# (key, label, higher is better)
ROWS = [
    ("tcp_up_1", "TCP c→s, 1 stream, Gbit/s", True),
    ("tcp_down_1", "TCP s→c, 1 stream, Gbit/s", True),
    ("tcp_up_4", "TCP c→s, 4 streams, Gbit/s", True),
    ("tcp_down_4", "TCP s→c, 4 streams, Gbit/s", True),
    ("cpu_per_gb", "NAT CPU s per GB (TCP runs)", False),
    ("udp_up_kpps", "UDP 64 B c→s, received kpps (loss)", True),
    ("udp_down_kpps", "UDP 64 B s→c, received kpps (loss)", True),
    ("tcp_rr_p50", "TCP request/response p50, µs", False),
    ("tcp_rr_p99", "TCP request/response p99, µs", False),
    ("udp_rr_p50", "UDP request/response p50, µs", False),
    ("udp_rr_p99", "UDP request/response p99, µs", False),
    ("conn_seq", "new connections/s, sequential", True),
    ("conn_32", "new connections/s, 32 concurrent", True),
    ("mem_idle", "NAT RSS idle (as started), MB", False),
    ("mem_before", "NAT RSS before the sessions (after the other measures), MB", False),
    ("mem_s1", "NAT RSS, {s1} idle TCP sessions, MB", False),
    ("mem_s2", "NAT RSS, {s2} idle TCP sessions, MB", False),
    ("kib_per_session", "NAT KiB per idle TCP session (at {s2}, from before them)", False),
    ("mem_after", "NAT RSS 5 s after they closed, MB", False),
]


def values_of(sample):
    """The table's values from one raw sample: {row key: (number, note or None)}."""
    m, d = sample["measure"], sample
    out = {}
    if "error" in d:
        return out
    if m in ("tcp_rr", "udp_rr"):
        out[m + "_p50"] = (d["p50_us"], None)
        out[m + "_p99"] = (d["p99_us"], None)
    elif m.startswith("tcp_"):
        out[m] = (d["gbps"], None)
    elif m.startswith("udp_"):
        out[m + "_kpps"] = (d["kpps"], "%.0f%% lost" % d["loss_pct"])
    elif m.startswith("conn_"):
        out[m] = (d["per_s"], "%d errors" % d["errors"] if d["errors"] else None)
    elif m == "mem":
        if d.get("idle_mb") is not None:
            out["mem_idle"] = (d["idle_mb"], None)
        if d.get("before_mb") is not None:
            out["mem_before"] = (d["before_mb"], None)
        steps = sorted(d["steps"].items(), key=lambda kv: int(kv[0]))
        for (key, (target, st)) in zip(("mem_s1", "mem_s2"), steps):
            if st["rss_mb"] is not None:
                note = None if st["opened"] >= int(target) else "%d opened" % st["opened"]
                out[key] = (st["rss_mb"], note)
        if steps:
            target, st = steps[-1]
            if st["rss_mb"] is not None and d.get("before_mb") is not None and st["opened"]:
                out["kib_per_session"] = ((st["rss_mb"] - d["before_mb"]) * 1024 / st["opened"], None)
        if d.get("after_close_mb") is not None:
            out["mem_after"] = (d["after_close_mb"], None)
    return out


def fmt(v):
    if v is None:
        return "–"
    if abs(v) >= 100:
        return "%.0f" % v
    if abs(v) >= 10:
        return "%.1f" % v
    return "%.2f" % v


def report(samples_path, out_path, meta):
    samples = []
    with open(samples_path) as f:
        for line in f:
            if line.strip():
                samples.append(json.loads(line))
    steps = meta.get("sessions", "1000 10000").split()
    s1, s2 = (steps + ["?", "?"])[:2] if len(steps) >= 2 else (steps[0] if steps else "?", "?")
    mtus = meta.get("mtus", "").split()
    present = [c for c in CONTENDERS if c in meta.get("contenders", "").split()]
    # (contender, mtu) -> row key -> [(value, note)]
    cells = {}
    notes = []
    cpu = {}  # (contender, mtu, round) -> [cpu_s, bytes]
    for s in samples:
        key = (s["contender"], s["mtu"])
        if s["measure"] == "skip":
            notes.append("round %s, MTU %s, %s: not measured: %s" % (s["round"], s["mtu"], s["contender"], s["why"]))
            continue
        if "error" in s:
            notes.append("round %s, MTU %s, %s, %s: %s" % (s["round"], s["mtu"], s["contender"], s["measure"], s["error"]))
            continue
        for k, v in values_of(s).items():
            cells.setdefault(key, {}).setdefault(k, []).append(v)
        if s["measure"].startswith("tcp_") and s.get("nat_cpu_s") is not None and s.get("bytes"):
            acc = cpu.setdefault((s["contender"], s["mtu"], s["round"]), [0.0, 0])
            acc[0] += s["nat_cpu_s"]
            acc[1] += s["bytes"]
        if s["measure"] == "mem" and s.get("first_error"):
            notes.append("round %s, MTU %s, %s, sessions: %d failed connects, first: %s" % (
                s["round"], s["mtu"], s["contender"], s["failures"], s["first_error"]))
    for (c, mtu, _), (secs, nbytes) in cpu.items():
        cells.setdefault((c, mtu), {}).setdefault("cpu_per_gb", []).append((secs / (nbytes / 1e9), None))

    def median(key, row):
        vals = cells.get(key, {}).get(row)
        if not vals:
            return None, None
        v = statistics.median(x for x, _ in vals)
        ns = [n for _, n in vals if n]
        return v, ns[len(ns) // 2] if ns else None

    lines = []
    result = {"meta": meta, "medians": {}, "samples": samples}
    for mtu in mtus:
        peers = [c for c in PEERS if c in present]
        ours = [c for c in OURS if c in present]
        head = ["measure (median of rounds)"] + present
        for o in ours:
            if peers:
                head.append("%s ÷ best peer" % o.replace("hubnat-", ""))
            if "kernel" in present:
                head.append("%s ÷ kernel" % o.replace("hubnat-", ""))
        lines.append("MTU %s (↑ higher is better, ↓ lower is better; ratios are hubnat's value ÷ the other's)" % mtu)
        lines.append("")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("| --- |" + " ---: |" * (len(head) - 1))
        for row, label, higher in ROWS:
            label = label.format(s1=s1, s2=s2)
            vals = {c: median((c, mtu), row) for c in present}
            if all(v is None for v, _ in vals.values()):
                continue
            result["medians"].setdefault(mtu, {})[row] = {c: v for c, (v, _) in vals.items()}
            cols = [("%s %s" % (label, "↑" if higher else "↓"))]
            for c in present:
                v, n = vals[c]
                if v is None and c == "kernel" and (row.startswith("mem") or row in ("kib_per_session", "cpu_per_gb")):
                    cols.append("n/a")
                else:
                    cols.append(fmt(v) + (" (%s)" % n if n and v is not None else ""))
            pv = [vals[p][0] for p in peers if vals[p][0] is not None]
            best = (max(pv) if higher else min(pv)) if pv else None
            kern = vals.get("kernel", (None, None))[0]
            for o in ours:
                ov = vals[o][0]
                if peers:
                    cols.append("%.2f" % (ov / best) if ov is not None and best else "–")
                if "kernel" in present:
                    cols.append("%.2f" % (ov / kern) if ov is not None and kern else "–")
            lines.append("| " + " | ".join(cols) + " |")
        lines.append("")
    if notes:
        lines.append("Not measured or failed:")
        lines.append("")
        for n in notes:
            lines.append("- " + n)
        lines.append("")
    text = "\n".join(lines)
    result["markdown"] = text
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(text)


# ---------------------------------------------------------------------------------------------

def record(argv, fn):
    """--out F --tag k=v ... -- ARGS: run fn(ARGS), append tags + result to F, print a line."""
    out, tags = None, {}
    i = 0
    while i < len(argv) and argv[i] != "--":
        if argv[i] == "--out":
            out = argv[i + 1]
        elif argv[i] == "--tag":
            k, v = argv[i + 1].split("=", 1)
            tags[k] = v
        i += 2
    args = argv[i + 1:]
    try:
        r = fn(*args)
    except Exception as e:  # a failed measurement is recorded, the run goes on
        r = {"error": "%s: %s" % (type(e).__name__, e)}
    r = dict(tags, **r)
    with open(out, "a") as f:
        f.write(json.dumps(r) + "\n")
    brief = {k: v for k, v in r.items() if k not in tags and k not in ("cmd", "steps")}
    if "steps" in r:
        brief["steps"] = {k: (v["opened"], round(v["rss_mb"] or 0, 1)) for k, v in r["steps"].items()}
    print("    %s: %s" % (tags.get("measure"), json.dumps(brief)), flush=True)
    return 0


def stacks(data, pid, top=40):
    """What process PID did in a `perf record -a -g` file: its share of all samples, the share
    of its samples taken in the kernel, and the functions found on the most of its sampled
    call stacks (each counted once per stack: a system call's share includes what runs inside
    it, a softirq delivering to another socket say)."""
    out = subprocess.run(["perf", "script", "-i", data, "-F", "pid,ip,sym"],
                         capture_output=True, text=True, check=True).stdout
    total = mine = kernel = 0
    on_stack = {}
    for sample in out.split("\n\n"):
        lines = sample.strip().splitlines()
        if not lines:
            continue
        total += 1
        if lines[0].split()[0] != pid:
            continue
        mine += 1
        frames = [l.split(None, 1) for l in lines[1:]]
        if frames and frames[0][0].startswith("ffff"):
            kernel += 1
        for f in {f[1] for f in frames if len(f) == 2}:
            on_stack[f] = on_stack.get(f, 0) + 1
    if not mine:
        print("no samples of PID %s" % pid)
        return
    print("%d of %d samples (%.0f %% of the machine); in the kernel %.0f %%, in user space %.0f %%"
          % (mine, total, 100 * mine / total, 100 * kernel / mine, 100 * (mine - kernel) / mine))
    for f, n in sorted(on_stack.items(), key=lambda kv: -kv[1])[:top]:
        print("%5.1f %%  %s" % (100 * n / mine, f))


def main():
    cmd, argv = sys.argv[1], sys.argv[2:]
    if cmd == "serve":
        serve(argv[0], int(argv[1]))
    elif cmd == "probe":
        why = probe(argv[0], int(argv[1]))
        if why:
            print(why)
            return 1
        return 0
    elif cmd == "iperf":
        return record(argv, lambda ns, ip, port, dur, *flags: iperf(ns, ip, port, dur, list(flags[1:]), flags[0]))
    elif cmd == "rr":
        return record(argv, lambda proto, ip, port, dur: rr(proto, ip, int(port), dur))
    elif cmd == "conn":
        return record(argv, lambda ip, port, dur, n: conn(ip, int(port), dur, n))
    elif cmd == "hold":
        return record(argv, lambda ip, port, steps, pid, idle: hold(ip, int(port), steps, pid, idle))
    elif cmd == "note":
        return record(argv, lambda why: {"measure": "skip", "why": why})
    elif cmd == "stacks":
        stacks(argv[0], argv[1])
    elif cmd == "report":
        meta = dict(kv.split("=", 1) for kv in argv[2:])
        report(argv[0], argv[1], meta)
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
