#!/usr/bin/env bash
# iperf3 through hubnat's frame backends side by side with the kernel: the throughput subset of
# scripts/bench.sh (the benchmark suite, which grew out of this script), under this script's
# old name and knobs.
#
#   scripts/bench-nat.sh                 # as root; DURATION=5 MTUS="1500 65520" BACKENDS="tap raw hub"
#   DURATION=10 MTUS=1500 BACKENDS="tap hub" scripts/bench-nat.sh
#
# It runs `MEASURES=tput ROUNDS=1 CONTENDERS="kernel hubnat-tap hubnat-raw hubnat-hub"
# scripts/bench.sh`: TCP c->s and s->c, 1 and 4 streams, and the NAT's CPU per GB, for each
# backend in BACKENDS and the kernel (veth + nftables masquerade). See scripts/bench.sh for the
# namespaces, the contenders and the output; ROUNDS, OUT, HUBNAT and BRIDGE pass through.
set -euo pipefail
cd "$(dirname "$0")/.."

contenders="kernel"
for b in ${BACKENDS:-tap raw hub}; do
  case "$b" in
    tap|raw|hub) contenders+=" hubnat-$b" ;;
    *) echo "bench-nat.sh: unknown backend '$b' in BACKENDS (tap, raw, hub)" >&2; exit 1 ;;
  esac
done
export CONTENDERS="$contenders" MEASURES=tput ROUNDS="${ROUNDS:-1}"
exec scripts/bench.sh
