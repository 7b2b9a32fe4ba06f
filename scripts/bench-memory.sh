#!/usr/bin/env bash
# bench-memory.sh — memory and restart time of a server holding many static
# locks (target: 1,000,000 locks under 1 GiB RSS, restart in under 10 s).
#
# On one machine, all on 127.0.0.1, in a temporary directory:
#   1. builds oclocks (release; honours CARGO_TARGET_DIR);
#   2. starts a 3-node `oclocks dev --dir DIR` cluster (default configs: no
#      limit is raised — the fill closes each session after
#      --fill-per-session locks, under limits.locks_per_session_max);
#   3. runs `oclocks bench --workloads fill`: LOCKS static locks (owner-key
#      signed, no TTL) taken by CLIENTS clients x PIPELINE acquires in flight,
#      and kept;
#   4. waits until every node applied the whole log, then reads each
#      server's VmRSS / VmHWM / RssAnon (/proc/PID/status), its applied index
#      and holders (/metrics), and the sizes of snapshots/current.snap and
#      raft-log/ (the Raft log's chunk files);
#   5. for each of RESTART (default "follower leader"): SIGKILLs that node
#      and starts it again with the same command line minus --bootstrap
#      (`oclocks server --config DIR/nodeN.toml`), and measures spawn ->
#      `/ready` answers 200, spawn -> its applied index reaches the leader's,
#      and its VmRSS / VmHWM once caught up (and SETTLE_S later);
# and prints a markdown report (stdout; OUT=FILE writes it too).
#
# Usage:
#   scripts/bench-memory.sh [BENCH ARGS...]      # extra `oclocks bench` flags
#
# Environment:
#   LOCKS=1000000 CLIENTS=16 PIPELINE=8   the fill
#   RESTART="follower leader"             which nodes to kill and restart, in order ("" = none);
#                                         "lagging": a follower killed before the fill and
#                                         started after it (catches up from the leader: log
#                                         entries, or a snapshot once the log is purged)
#   SETTLE_S=5                            wait after catch-up before the last RSS read
#   READY_TIMEOUT_S=120                   give up on a restarted node after this
#   CARGO_TARGET_DIR                      where oclocks is built (default target)
#   SKIP_BUILD=1                          use the built binary as it is
#   OUT=FILE                              also write the report to FILE
#   KEEP=1                                keep the temporary directory (logs, data)
#   MARKER=FILE                           create FILE while running, remove it at exit
#   DIAG_MALLOC_TRIM=1                    diagnosis: after the fill, call glibc's
#                                         malloc_trim(0) in each server (through gdb)
#                                         and report its RSS after: the part of RSS
#                                         that is memory freed but kept by malloc
#   MALLOC_ARENA_MAX, LD_PRELOAD etc.     allocator settings reach the servers
#                                         (through `oclocks dev`); listed in the report
#   SNAPSHOT_EVERY=N                      add `[raft] snapshot_every_entries = N` to the
#                                         node configs (default 20,000; a fill batches
#                                         ~60 LOCKs per log entry, so 1M locks are
#                                         ~17k entries: no snapshot at the default)
#
# Only processes this script started are ever signalled: the `oclocks dev`
# parent (SIGTERM, which stops its nodes) and the servers it restarted; at
# exit a dev node still alive is killed only if its command line names this
# run's directory. Restart times are with a warm page cache (the snapshot
# and log were just written). The machine should be otherwise idle.
#
# Exit status: 0; 1 on errors (cluster did not start, fill failed, a
# restarted node did not serve within READY_TIMEOUT_S).
set -euo pipefail

say() { echo "bench-memory: $*" >&2; }
die() { say "$*"; exit 1; }

case ${1:-} in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac

LOCKS=${LOCKS:-1000000}
CLIENTS=${CLIENTS:-16}
PIPELINE=${PIPELINE:-8}
RESTART=${RESTART-follower leader}
SETTLE_S=${SETTLE_S:-5}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-120}
for v in LOCKS CLIENTS PIPELINE SETTLE_S READY_TIMEOUT_S ${SNAPSHOT_EVERY:+SNAPSHOT_EVERY}; do
  case ${!v} in ''|*[!0-9]*) die "$v must be a number" ;; esac
done
for r in $RESTART; do
  case $r in follower|leader|lagging) ;; *) die "RESTART: 'follower', 'leader' or 'lagging', not '$r'" ;; esac
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
OCLOCKS=$TARGET_DIR/release/oclocks

if [ -z "${SKIP_BUILD:-}" ]; then
  say "building oclocks (release) in $TARGET_DIR"
  (cd "$REPO" && cargo build --release -p oclocks) >&2
fi
[ -x "$OCLOCKS" ] || die "no binary at $OCLOCKS"
command -v curl >/dev/null || die "needs curl"
command -v jq >/dev/null || die "needs jq"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/oclocks-mem.XXXXXX")
DIR=$WORK/cluster
DEV_PID=
BENCH_PID=
declare -A NODE_PID=()   # node id -> pid of its current server process
declare -A MINE=()       # pids of servers this script started itself
declare -A BASE_RSS=()   # node id -> VmRSS (kB) before the fill

alive() { [ -n "$1" ] && [ -e "/proc/$1" ] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  if [ -n "$BENCH_PID" ] && alive "$BENCH_PID"; then
    kill -TERM "$BENCH_PID" 2>/dev/null || true
    wait "$BENCH_PID" 2>/dev/null || true
  fi
  for pid in "${!MINE[@]}"; do
    if alive "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  for pid in "${!MINE[@]}"; do
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "$DEV_PID" ] && alive "$DEV_PID"; then
    kill -TERM "$DEV_PID" 2>/dev/null || true
    for _ in $(seq 300); do alive "$DEV_PID" || break; sleep 0.1; done
    if alive "$DEV_PID"; then kill -KILL "$DEV_PID" 2>/dev/null || true; fi
    wait "$DEV_PID" 2>/dev/null || true
  fi
  # Nodes of this run's dev cluster that outlived it (only if dev was killed).
  if [ -f "$DIR/cluster.json" ]; then
    for pid in $(jq -r '.[].pid' "$DIR/cluster.json"); do
      if alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$DIR/node"; then
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done
  fi
  if [ -n "${MARKER:-}" ]; then rm -f "$MARKER"; fi
  if [ -n "${KEEP:-}" ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "${MARKER:-}" ]; then
  echo "bench-memory.sh pid $$ since $(date -u +%FT%TZ), $LOCKS locks" >"$MARKER"
fi

now() { date +%s.%N; }
secs_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
mib() { awk -v k="${1:-0}" 'BEGIN { printf "%.0f", k / 1024 }'; }
file_mib() { if [ -f "$1" ]; then awk -v b="$(stat -c %s "$1")" 'BEGIN { printf "%.1f", b / 1048576 }'; else echo "-"; fi; }
# Apparent size of the files under a directory (the WAL's chunk files).
dir_mib() { if [ -d "$1" ]; then du -sb "$1" | awk '{ printf "%.1f", $1 / 1048576 }'; else echo "-"; fi; }
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || true; }

node_field() { jq -r --argjson id "$1" ".[] | select(.id == \$id) | .$2" "$DIR/cluster.json"; }
http_of() { node_field "$1" http_addr; }
config_of() { node_field "$1" config; }
log_of() { node_field "$1" log; }
data_of() { echo "$DIR/node$1-data"; }

# metric ID NAME: the value of oclocks_NAME on node ID ("" if unreachable).
metric() {
  curl -s --max-time 10 "http://$(http_of "$1")/metrics" 2>/dev/null \
    | awk -v m="oclocks_$2" '$1 == m { print $2 }' || true
}
is_ready() { [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$(http_of "$1")/ready" 2>/dev/null)" = 200 ]; }
NODES=(1 2 3)

declare -A DOWN=()       # node id -> 1 while this script keeps it killed
live_nodes() { local id; for id in "${NODES[@]}"; do [ -n "${DOWN[$id]:-}" ] || echo "$id"; done; }

leader() {
  local id
  for id in $(live_nodes); do
    if [ "$(metric "$id" raft_is_leader)" = 1 ]; then echo "$id"; return; fi
  done
}

# wait_converged TIMEOUT_S: until every live node reports the same applied
# index (printed).
wait_converged() {
  local deadline=$(( $(date +%s) + $1 )) id v vals uniq
  while :; do
    vals=()
    for id in $(live_nodes); do v=$(metric "$id" raft_applied_index); vals+=("${v:-x}"); done
    uniq=$(printf '%s\n' "${vals[@]}" | sort -u)
    if [ "$(echo "$uniq" | wc -l)" = 1 ] && [ "$uniq" != x ]; then
      echo "$uniq"; return 0
    fi
    [ "$(date +%s)" -lt "$deadline" ] || { say "applied indexes did not converge: ${vals[*]}"; return 1; }
    sleep 1
  done
}

# ---- 1. the cluster -------------------------------------------------------
start_dev() {
  "$OCLOCKS" dev --dir "$DIR" --start-timeout 60s >"$WORK/dev.out" 2>&1 &
  DEV_PID=$!
  local deadline=$(( $(date +%s) + 90 ))
  until grep -q 'dev cluster:' "$WORK/dev.out" 2>/dev/null; do
    alive "$DEV_PID" || { cat "$WORK/dev.out" >&2; die "oclocks dev exited"; }
    [ "$(date +%s)" -lt "$deadline" ] || { cat "$WORK/dev.out" >&2; die "the dev cluster did not start"; }
    sleep 0.2
  done
}
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
say "starting a 3-node dev cluster in $DIR"
start_dev
if [ -n "${SNAPSHOT_EVERY:-}" ]; then
  # `oclocks dev` writes its node configs once and reuses them: stop it,
  # add the setting, start it again (same data, node 1 does not bootstrap).
  say "restarting the cluster with [raft] snapshot_every_entries = $SNAPSHOT_EVERY"
  kill -TERM "$DEV_PID"
  wait "$DEV_PID" 2>/dev/null || true
  for id in 1 2 3; do
    printf '\n[raft]\nsnapshot_every_entries = %s\n' "$SNAPSHOT_EVERY" >>"$DIR/node$id.toml"
  done
  start_dev
fi
for id in "${NODES[@]}"; do NODE_PID[$id]=$(node_field "$id" pid); done
for id in "${NODES[@]}"; do
  BASE_RSS[$id]=$(status_kb "${NODE_PID[$id]}" VmRSS)
done

# ---- 3. restarts (helpers) ---------------------------------------------------
# kill_node ID: SIGKILL its server and wait until it is gone.
kill_node() {
  local id=$1 old=${NODE_PID[$1]}
  kill -KILL "$old"
  for _ in $(seq 100); do alive "$old" || break; sleep 0.05; done
  alive "$old" && die "pid $old survived SIGKILL"
  if [ -n "${MINE[$old]:-}" ]; then wait "$old" 2>/dev/null || true; unset "MINE[$old]"; fi
  DOWN[$id]=1
}
a_follower() {
  local id lead=$1
  for id in $(live_nodes); do [ "$id" != "$lead" ] && { echo "$id"; return; }; done
}

LAGGING=
case " $RESTART " in
  *" lagging "*)
    lead=$(leader)
    [ -n "$lead" ] || die "no leader"
    LAGGING=$(a_follower "$lead")
    say "lagging: killing follower node $LAGGING (pid ${NODE_PID[$LAGGING]}) before the fill"
    kill_node "$LAGGING" ;;
esac

# ---- 2. the fill ------------------------------------------------------------
say "fill: $LOCKS static locks, $CLIENTS clients x $PIPELINE in flight"
fill_start=$(now)
# In the background, so that a signal to this script is handled at once
# (bash runs traps only between foreground commands, or during `wait`).
"$OCLOCKS" bench --config "$DIR/client.toml" --workloads fill --runs 1 \
  --fill-locks "$LOCKS" --fill-clients "$CLIENTS" --fill-pipeline "$PIPELINE" \
  --op-timeout-s 30 --label oclocks "$@" --json --out "$WORK/fill.md" \
  >"$WORK/fill.json" 2>"$WORK/fill.err" &
BENCH_PID=$!
bench_rc=0
wait "$BENCH_PID" || bench_rc=$?
BENCH_PID=
cat "$WORK/fill.err" >&2
[ "$bench_rc" = 0 ] || die "oclocks bench exited $bench_rc (see above)"
fill_secs=$(secs_since "$fill_start")
LOAD_FILL=$(cut -d' ' -f1-3 /proc/loadavg)
taken=$(jq -r '.fill[0].locks_taken' "$WORK/fill.json")
rate=$(jq -r '.fill[0].locks_per_s | floor' "$WORK/fill.json")
fill_errors=$(jq -r '.fill[0].errors' "$WORK/fill.json")
sessions=$(jq -r '.fill[0].sessions' "$WORK/fill.json")
name_bytes=$(jq -r '.fill[0].name_bytes' "$WORK/fill.json")
acq_p50=$(jq -r '.fill[0].acquire.p50' "$WORK/fill.json")
acq_p99=$(jq -r '.fill[0].acquire.p99' "$WORK/fill.json")
[ "$taken" = "$LOCKS" ] || say "WARNING: only $taken of $LOCKS locks taken ($fill_errors errors)"

say "waiting until every node applied the whole log"
applied=$(wait_converged 300) || die "nodes did not converge"
sleep 2 # a snapshot triggered by the last entries may still be written
LEADER=$(leader)
[ -n "$LEADER" ] || die "no leader"

node_table() {
  local id pid role t0 ms
  echo "| node | role | pid | applied index | holders | VmRSS MiB | VmHWM MiB | RssAnon MiB | RSS at start MiB | threads | snapshot MiB | raft-log/ MiB | /metrics scrape ms |"
  echo "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
  for id in "${NODES[@]}"; do
    pid=${NODE_PID[$id]}
    if [ -n "${DOWN[$id]:-}" ]; then
      echo "| $id | down | - | - | - | - | - | - | $(mib "${BASE_RSS[$id]:-0}") | - | $(file_mib "$(data_of "$id")/snapshots/current.snap") | $(dir_mib "$(data_of "$id")/raft-log") | - |"
      continue
    fi
    role=follower; [ "$(metric "$id" raft_is_leader)" = 1 ] && role=leader
    ms=$(curl -s -o /dev/null -w '%{time_total}' --max-time 10 "http://$(http_of "$id")/metrics" | awk '{ printf "%.0f", $1 * 1000 }')
    echo "| $id | $role | $pid | $(metric "$id" raft_applied_index) | $(metric "$id" holders) | $(mib "$(status_kb "$pid" VmRSS)") | $(mib "$(status_kb "$pid" VmHWM)") | $(mib "$(status_kb "$pid" RssAnon)") | $(mib "${BASE_RSS[$id]:-0}") | $(status_kb "$pid" Threads) | $(file_mib "$(data_of "$id")/snapshots/current.snap") | $(dir_mib "$(data_of "$id")/raft-log") | $ms |"
  done
}
AFTER_FILL=$(node_table)
say "after the fill:"; echo "$AFTER_FILL" >&2
TRIM_ROWS=()
if [ -n "${DIAG_MALLOC_TRIM:-}" ]; then
  command -v gdb >/dev/null || die "DIAG_MALLOC_TRIM needs gdb"
  for id in $(live_nodes); do
    pid=${NODE_PID[$id]}
    before=$(mib "$(status_kb "$pid" VmRSS)")
    t0=$(now)
    gdb -p "$pid" -batch -nx -ex 'call (int) malloc_trim(0)' >"$WORK/gdb-$id.out" 2>&1 \
      || say "gdb on node $id failed (see $WORK/gdb-$id.out)"
    TRIM_ROWS+=("| $id | $before | $(mib "$(status_kb "$pid" VmRSS)") | $(secs_since "$t0") |")
  done
  say "malloc_trim:"; printf '%s\n' "${TRIM_ROWS[@]}" >&2
  wait_converged 120 >/dev/null || die "a node did not survive malloc_trim"
fi

# ---- 3. restarts --------------------------------------------------------------
RESTART_ROWS=()
# log_offset ID FROM_LINE T0 PATTERN: seconds from T0 to the timestamp of the
# first line of node ID's log (from FROM_LINE on) matching PATTERN, or "-".
log_offset() {
  local ts at
  ts=$(tail -n +"$2" "$(log_of "$1")" | grep -m1 -- "$4" | awk '{ print $1 }' || true)
  [ -n "$ts" ] || { echo "-"; return; }
  at=$(date -d "$ts" +%s.%N 2>/dev/null) || { echo "-"; return; }
  awk -v a="$3" -v b="$at" 'BEGIN { printf "%.2f", b - a }'
}
restart_one() {
  local which=$1 victim t0 t_ready t_caught lead_idx idx pid rss hwm rss2 hwm2 restored up installed
  if [ "$which" = lagging ]; then
    victim=$LAGGING
    say "restart the lagging follower: node $victim (down since before the fill)"
  else
    LEADER=$(leader)
    [ -n "$LEADER" ] || die "no leader before restarting the $which"
    if [ "$which" = leader ]; then victim=$LEADER; else victim=$(a_follower "$LEADER"); fi
    say "restart the $which: node $victim (pid ${NODE_PID[$victim]})"
    kill_node "$victim"
    # Let the others notice (and elect a new leader if it was the leader).
    sleep 2
  fi
  echo "=== restarted by bench-memory.sh at $(date -u +%FT%TZ) ===" >>"$(log_of "$victim")"
  local logline
  logline=$(wc -l <"$(log_of "$victim")")
  t0=$(now)
  "$OCLOCKS" server --config "$(config_of "$victim")" >>"$(log_of "$victim")" 2>&1 &
  pid=$!
  MINE[$pid]=1
  NODE_PID[$victim]=$pid
  unset "DOWN[$victim]"
  until is_ready "$victim"; do
    alive "$pid" || die "restarted node $victim exited (log: $(log_of "$victim"))"
    [ "$(awk -v a="$t0" -v b="$(now)" 'BEGIN { print (b - a > '"$READY_TIMEOUT_S"') }')" = 0 ] \
      || die "node $victim not ready within ${READY_TIMEOUT_S}s"
    sleep 0.01
  done
  t_ready=$(secs_since "$t0")
  while :; do
    idx=$(metric "$victim" raft_applied_index)
    lead_idx=$(metric "$(leader)" raft_applied_index)
    if [ -n "$idx" ] && [ -n "$lead_idx" ] && [ "$idx" -ge "$lead_idx" ]; then break; fi
    [ "$(awk -v a="$t0" -v b="$(now)" 'BEGIN { print (b - a > '"$READY_TIMEOUT_S"') }')" = 0 ] \
      || die "node $victim did not catch up within ${READY_TIMEOUT_S}s ($idx < $lead_idx)"
    sleep 0.1
  done
  t_caught=$(secs_since "$t0")
  rss=$(mib "$(status_kb "$pid" VmRSS)"); hwm=$(mib "$(status_kb "$pid" VmHWM)")
  sleep "$SETTLE_S"
  rss2=$(mib "$(status_kb "$pid" VmRSS)"); hwm2=$(mib "$(status_kb "$pid" VmHWM)")
  # The server's own account (log timestamps, seconds after the spawn):
  # snapshot restored, and listening (storage opened, log read).
  restored=$(log_offset "$victim" "$logline" "$t0" 'restored from snapshot')
  up=$(log_offset "$victim" "$logline" "$t0" 'server: listening')
  installed=$(log_offset "$victim" "$logline" "$t0" 'snapshot installed')
  RESTART_ROWS+=("| $which | $victim | $t_ready | $t_caught | $idx | $(metric "$victim" holders) | $rss | $hwm | $rss2 | $hwm2 | $restored | $up | $installed |")
  say "node $victim: ready after ${t_ready}s, caught up after ${t_caught}s, VmRSS $rss MiB (VmHWM $hwm), after ${SETTLE_S}s $rss2 MiB"
}
# The lagging follower first: with it down, killing another node would
# leave no quorum.
if [ -n "$LAGGING" ]; then restart_one lagging; fi
for which in $RESTART; do
  if [ "$which" != lagging ]; then restart_one "$which"; fi
done

# ---- 4. the report ------------------------------------------------------------
report() {
  echo "## Memory and restart with $LOCKS static locks"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- machine: nproc $(nproc), $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), RAM $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r)"
  echo "- oclocks: $("$OCLOCKS" --version 2>/dev/null || echo '?'), 3-node \`oclocks dev\` cluster, default configs (no limit raised)${SNAPSHOT_EVERY:+ except [raft] snapshot_every_entries = $SNAPSHOT_EVERY}"
  echo "- load average (1, 5, 15 min; this run's processes included): $LOAD_START at the start, $LOAD_FILL after the fill"
  local malloc_env
  malloc_env=$(env | grep -E '^(MALLOC_|LD_PRELOAD=)' | tr '\n' ' ' || true)
  if [ -n "$malloc_env" ]; then echo "- malloc environment of the servers: \`${malloc_env% }\`"; fi
  echo "- command: \`${SNAPSHOT_EVERY:+SNAPSHOT_EVERY=$SNAPSHOT_EVERY }LOCKS=$LOCKS CLIENTS=$CLIENTS PIPELINE=$PIPELINE scripts/bench-memory.sh${*:+ $*}\`"
  echo "- fill: $taken of $LOCKS locks in ${fill_secs} s ($rate locks/s; acquire p50 $acq_p50 ms, p99 $acq_p99 ms), $CLIENTS clients x $PIPELINE in flight, $sessions sessions, names of $name_bytes bytes, errors $fill_errors; log applied up to index $applied"
  echo
  echo "### After the fill"
  echo
  echo "$AFTER_FILL"
  echo
  echo "VmHWM = peak RSS of the process so far (snapshot builds included). RSS at start = before the fill."
  echo
  if [ ${#TRIM_ROWS[@]} -gt 0 ]; then
    echo "### Diagnosis: glibc malloc_trim(0) in each server after the fill"
    echo
    echo "| node | VmRSS before MiB | VmRSS after MiB | gdb attach+trim s |"
    echo "|--:|--:|--:|--:|"
    printf '%s\n' "${TRIM_ROWS[@]}"
    echo
  fi
  if [ ${#RESTART_ROWS[@]} -gt 0 ]; then
    echo "### Restart (SIGKILL, then \`oclocks server --config nodeN.toml\`)"
    echo
    echo "| killed | node | spawn → /ready s | spawn → caught up s | applied index | holders | VmRSS MiB | VmHWM MiB | VmRSS ${SETTLE_S} s later | VmHWM ${SETTLE_S} s later | log: snapshot restored s | log: listening s | log: snapshot installed s |"
    echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    printf '%s\n' "${RESTART_ROWS[@]}"
    echo
    echo "Times in seconds after the spawn. caught up = its applied index reached the leader's (polled every 0.1 s through /metrics). log: the server's own log timestamps of \`state machine restored from snapshot\` and \`listening\` (- = no such line: no snapshot yet), and of \`snapshot installed\` (a snapshot received from the leader). lagging = a follower killed before the fill, started after it. Warm page cache."
    echo
  fi
}
REPORT=$(report "$@")
echo "$REPORT"
if [ -n "${OUT:-}" ]; then echo "$REPORT" >"$OUT"; fi
