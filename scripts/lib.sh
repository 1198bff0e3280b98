# Shell functions the namespace scripts (bench.sh, bench-policy.sh, soak.sh) share. Source it from
# the repository's root: `. scripts/lib.sh`.
# shellcheck shell=bash

# stop_list ARRAY_NAME: stops every process whose PID is in the array (SIGTERM, up to 5 s,
# then SIGKILL), each by its PID, and empties the array.
stop_list() {
  local -n list=$1
  local p
  for p in "${list[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${list[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  list=()
}

# new_ns NAME: a network namespace with its loopback up.
new_ns() { ip netns add "$1" && ip -n "$1" link set lo up; }

# in_ns NAME COMMAND...: runs COMMAND in namespace NAME (exec'd, so $! is its PID).
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
