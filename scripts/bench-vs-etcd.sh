#!/usr/bin/env bash
# bench-vs-etcd.sh — OpenCluster-Locks next to etcd, same machine, same
# workloads, same parameters, alternating runs.
#
# Starts (all on 127.0.0.1, in a temporary directory, stopped on exit):
#   - a 3-node `oclocks dev` cluster (release build of this repository);
#   - a 3-member etcd cluster (Debian's etcd-server, the anchors' flags:
#     fsync on every commit, revision auto-compaction), client ports
#     ETCD_PORT_BASE+1..+3 (default 24791-24793), peers +11..+13;
# builds lockbench (../shared/lockbench), then runs, RUNS times,
#   oclocks bench --runs 1 ARGS...                   (backend label: oclocks)
#   lockbench --backend etcd-3=... --runs 1 ARGS...  (backend label: etcd-3)
# alternating (ours, etcd, ours, etcd, ...), and prints on stdout
#   1. the tables of every run (lockbench's format; run = the alternation),
#   2. the ratio table: per workload, C and metric, the median over the runs
#      of ours and of etcd, and ours / etcd.
#
# Usage:
#   scripts/bench-vs-etcd.sh [--runs N] [BENCH ARGS...]
#   scripts/bench-vs-etcd.sh --report DIR     # report again from a KEEP=1 directory
#
#   --runs N     alternations (default 2); each bench invocation does one run
#   BENCH ARGS   flags both benches understand, passed to both unchanged:
#                --workloads uncontended,contended,failover  --duration-s 10
#                --max-ops N  --uncontended 1,16,64  --contended 2,16,64
#                --failover-ttl-s 2  --failover-trials 5  --hold-us 0
#                --drain-timeout-s 60  --session-ttl-s 10  --op-timeout-s 5
#                --failover-settle-ms 500  --threads 2
#                (not --cancel-at-deadline: it wedges etcd 3.4's lock
#                service, see ../shared/lockbench/notes-anchors.md)
#
# Examples:
#   scripts/bench-vs-etcd.sh                  # defaults: 2 x (ours + etcd), ~1.5 min each, + builds
#   scripts/bench-vs-etcd.sh --runs 3 --duration-s 5 --workloads contended
#
# Environment:
#   LOCKBENCH_DIR         lockbench sources (default ../shared/lockbench next
#                         to the repository, else /work/shared/lockbench)
#   LOCKBENCH_TARGET_DIR  where lockbench is built (default target/lockbench)
#   CARGO_TARGET_DIR      where oclocks is built (default target)
#   ETCD_PORT_BASE        default 24790
#   OUT                   also write the report to this file
#   KEEP=1                keep the temporary directory (logs, each run's report)
#
# Needs: cargo; etcd (Debian package etcd-server) and protoc (package
# protobuf-compiler, to build lockbench's etcd client). Run as root, the
# script installs the missing packages with apt-get; otherwise it says what
# to install and stops. The machine should be otherwise idle: both clusters
# and both load generators share its cores (the cluster not being measured
# only heartbeats).
#
# Exit status: 0; 1 on errors or when a bench invocation failed (listed at
# the end of the report; `oclocks bench` exits 2 when a safety check failed).
set -euo pipefail

say() { echo "bench-vs-etcd: $*" >&2; }

RUNS=2
ARGS=()
REPORT_DIR=
while [ $# -gt 0 ]; do
  case $1 in
    --runs) RUNS=${2:?--runs needs a number}; shift 2 ;;
    --runs=*) RUNS=${1#--runs=}; shift ;;
    --report) REPORT_DIR=${2:?--report needs a directory}; shift 2 ;;
    --cancel-at-deadline)
      say "--cancel-at-deadline wedges etcd 3.4's lock service; run it by hand"
      exit 2 ;;
    --label|--label=*|--backend|--backend=*|--out|--out=*|--json)
      say "$1 is set by this script"; exit 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
case $RUNS in ''|*[!0-9]*|0) say "--runs must be a positive number"; exit 2 ;; esac

REPO=$(cd "$(dirname "$0")/.." && pwd)
OCLOCKS_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
OCLOCKS=$OCLOCKS_TARGET_DIR/release/oclocks
FAILED=()

# make_report DIR RUNS: the report, on stdout, from DIR/ours-N.md and
# DIR/etcd-N.md (N = 1..RUNS; the markdown reports of the two benches).
make_report() {
  local dir=$1 runs=$2 run f
  local -a files=()
  for run in $(seq 1 "$runs"); do
    for f in "$dir/ours-$run.md" "$dir/etcd-$run.md"; do
      if [ -f "$f" ]; then files+=("$f"); fi
    done
  done
  if [ ${#files[@]} -eq 0 ]; then say "no bench report in $dir"; return 1; fi

  echo "# oclocks vs etcd on this machine"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- machine: nproc $(nproc), $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), kernel $(uname -r)"
  echo "- oclocks: $("$OCLOCKS" --version 2>/dev/null || echo '?'), 3-node \`oclocks dev\` cluster"
  echo "- etcd: $(etcd --version 2>/dev/null | head -1 || echo '?'), 3 members (the anchors' flags)"
  echo "- alternating runs: $runs; bench args: \`${ARGS[*]:-(defaults)}\`"
  echo

  # 1. Every run's rows under one header per table, by C, ours first;
  #    run = the alternation.
  awk -v ours=oclocks '
    function trim(s) { gsub(/^[ \t]+|[ \t]+$/, "", s); return s }
    FNR == 1 { it = FILENAME; sub(/.*-/, "", it); sub(/\.md$/, "", it) }
    /^### [abc]\. / { sec = substr($0, 5, 1); if (!(sec in title)) title[sec] = $0; next }
    /^### / { sec = ""; next }
    sec != "" && /^\|/ {
      if ($0 ~ /^\| backend / || $0 ~ /^\|---/) {
        if (!((sec, $0) in hdr)) { hdr[sec, $0] = 1; head[sec] = head[sec] $0 "\n" }
        next
      }
      n = split($0, f, "|"); for (i = 1; i <= n; i++) f[i] = trim(f[i])
      col = (sec == "c") ? 3 : 4
      line = "|"; for (i = 2; i < n; i++) line = line " " (i == col ? it : f[i]) " |"
      key = sprintf("%08d %d %06d", (sec == "c") ? 0 : f[3], (f[2] == ours) ? 0 : 1, it)
      m = ++nrows[sec]; rkey[sec, m] = key; rline[sec, m] = line
    }
    END {
      split("a b c", secs, " ")
      for (s = 1; s <= 3; s++) {
        k = secs[s]; if (!(k in title)) continue
        printf "%s\n\n%s", title[k], head[k]
        for (i = 1; i <= nrows[k]; i++) { ord[i] = i }
        for (i = 2; i <= nrows[k]; i++) {
          t = ord[i]; j = i - 1
          while (j >= 1 && rkey[k, ord[j]] > rkey[k, t]) { ord[j + 1] = ord[j]; j-- }
          ord[j + 1] = t
        }
        for (i = 1; i <= nrows[k]; i++) print rline[k, ord[i]]
        print ""
      }
    }' "${files[@]}"

  # 2. The ratio table: medians over the runs, ours / etcd.
  echo "### Ratio oclocks / etcd-3 (median of the alternating runs of each)"
  echo
  echo "| workload | C | metric | better | oclocks | etcd-3 | oclocks / etcd-3 |"
  echo "|---|--:|---|---|--:|--:|--:|"
  awk -v ours=oclocks -v theirs=etcd-3 '
    function trim(s) { gsub(/^[ \t]+|[ \t]+$/, "", s); return s }
    function add(b, s, c, m, v,   k) {
      if (v !~ /^-?[0-9]+(\.[0-9]+)?$/) return
      k = s SUBSEP c SUBSEP m
      if (!(k in seen)) { seen[k] = 1; order[++nk] = k }
      cnt[b, k]++; val[b, k, cnt[b, k]] = v + 0
    }
    function median(b, k,   n, i, j, t, a) {
      n = cnt[b, k]; if (n == 0) return ""
      for (i = 1; i <= n; i++) a[i] = val[b, k, i]
      for (i = 2; i <= n; i++) { t = a[i]; j = i - 1; while (j >= 1 && a[j] > t) { a[j + 1] = a[j]; j-- } a[j + 1] = t }
      return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function fmt(x,   ax) {
      if (x == "") return "-"
      ax = (x < 0) ? -x : x
      if (ax == 0) return "0"
      if (ax < 1) return sprintf("%.3f", x)
      if (ax < 100) return sprintf("%.2f", x)
      return sprintf("%.0f", x)
    }
    /^### a\. / { sec = "a"; next }
    /^### b\. / { sec = "b"; next }
    /^### c\. / { sec = "c"; next }
    /^### / { sec = ""; next }
    sec != "" && /^\| / && !/^\| backend / {
      n = split($0, f, "|"); for (i = 1; i <= n; i++) f[i] = trim(f[i])
      b = f[2]
      if (sec == "a") {
        add(b, "uncontended", f[3], "cycles/s", f[5]); add(b, "uncontended", f[3], "acquire p50 ms", f[6])
        add(b, "uncontended", f[3], "acquire p99 ms", f[7]); add(b, "uncontended", f[3], "cycle p50 ms", f[9])
        add(b, "uncontended", f[3], "cycle p99 ms", f[10])
      } else if (sec == "b") {
        add(b, "contended", f[3], "handoffs/s", f[5]); add(b, "contended", f[3], "wait p50 ms", f[6])
        add(b, "contended", f[3], "wait p99 ms", f[7]); add(b, "contended", f[3], "wait max ms", f[9])
      } else {
        add(b, "failover", "-", "crash->grant p50 ms", f[7]); add(b, "failover", "-", "crash->grant max ms", f[8])
        add(b, "failover", "-", "past lease expiry p50 ms", f[9])
      }
    }
    END {
      for (i = 1; i <= nk; i++) {
        split(order[i], p, SUBSEP)
        mo = median(ours, order[i]); me = median(theirs, order[i])
        r = (mo != "" && me != "" && mo > 0 && me > 0) ? sprintf("%.2f", mo / me) : "n/a"
        better = (p[3] ~ /\/s$/) ? "higher" : "lower"
        printf "| %s | %s | %s | %s | %s | %s | %s |\n", p[1], p[2], p[3], better, fmt(mo), fmt(me), r
      }
    }' "${files[@]}"
  echo
  echo "Medians over the runs of each backend (each run is one \`--runs 1\` invocation, the two"
  echo "backends alternating). ratio > 1 is better for rates, < 1 is better for latencies; n/a where"
  echo "a side has no value or a value ≤ 0. Each run's full report (errors, backend notes, etcd's"
  echo "server-side histograms) stays in the temporary directory with KEEP=1."
  if [ ${#FAILED[@]} -gt 0 ]; then
    echo
    echo "### Bench invocations that failed"
    echo
    for f in "${FAILED[@]}"; do echo "- $f"; done
  fi
}

if [ -n "$REPORT_DIR" ]; then
  n=0
  while [ -f "$REPORT_DIR/ours-$((n + 1)).md" ] || [ -f "$REPORT_DIR/etcd-$((n + 1)).md" ]; do n=$((n + 1)); done
  make_report "$REPORT_DIR" "$((n > 0 ? n : 1))"
  exit
fi

if [ -z "${LOCKBENCH_DIR:-}" ]; then
  if [ -d "$REPO/../shared/lockbench" ]; then LOCKBENCH_DIR=$REPO/../shared/lockbench
  else LOCKBENCH_DIR=/work/shared/lockbench; fi
fi
[ -f "$LOCKBENCH_DIR/Cargo.toml" ] || { say "no lockbench at $LOCKBENCH_DIR (set LOCKBENCH_DIR)"; exit 1; }
LOCKBENCH_DIR=$(cd "$LOCKBENCH_DIR" && pwd)
LOCKBENCH_TARGET_DIR=${LOCKBENCH_TARGET_DIR:-$REPO/target/lockbench}
LOCKBENCH=$LOCKBENCH_TARGET_DIR/release/lockbench
ETCD_PORT_BASE=${ETCD_PORT_BASE:-24790}

# ---- prerequisites ----
command -v cargo >/dev/null || { say "cargo not found"; exit 1; }
need_pkgs=()
command -v etcd >/dev/null || need_pkgs+=(etcd-server)
command -v protoc >/dev/null || need_pkgs+=(protobuf-compiler)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing ${need_pkgs[*]} (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    say "missing: ${need_pkgs[*]}; install them (as root: apt-get install -y ${need_pkgs[*]}) and run again"
    exit 1
  fi
fi

port_open() { (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; }
for i in 1 2 3; do
  for p in $((ETCD_PORT_BASE + i)) $((ETCD_PORT_BASE + 10 + i)); do
    if port_open "$p"; then say "port $p is in use; set ETCD_PORT_BASE"; exit 1; fi
  done
done

# ---- build (before starting anything: builds take the cores) ----
say "building oclocks (release) in $OCLOCKS_TARGET_DIR"
(cd "$REPO" && CARGO_TARGET_DIR=$OCLOCKS_TARGET_DIR cargo build --release --quiet -p oclocks)
say "building lockbench (release) from $LOCKBENCH_DIR in $LOCKBENCH_TARGET_DIR"
CARGO_TARGET_DIR=$LOCKBENCH_TARGET_DIR cargo build --release --quiet --locked \
  --manifest-path "$LOCKBENCH_DIR/Cargo.toml"

# ---- start both clusters; stop them on exit ----
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench-vs-etcd.XXXXXX")
DEV_PID=
ETCD_PIDS=()

stop_pid() { # stop_pid PID NAME: SIGTERM, then SIGKILL after 10 s
  local pid=$1 name=$2 n=100
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  while [ $n -gt 0 ] && kill -0 "$pid" 2>/dev/null; do sleep 0.1; n=$((n - 1)); done
  if kill -0 "$pid" 2>/dev/null; then
    say "$name (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
}

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  set +e
  if [ -n "$DEV_PID" ]; then
    stop_pid "$DEV_PID" "oclocks dev"   # it stops its nodes on SIGTERM
    # Nodes left by a dev process that died hard: by the pids it recorded,
    # and only if they still are oclocks processes.
    if [ -f "$WORK/oclocks/cluster.json" ]; then
      # shellcheck disable=SC2013  # numbers, one per word
      for pid in $(grep -o '"pid": *[0-9]*' "$WORK/oclocks/cluster.json" | grep -o '[0-9]*$'); do
        if [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = oclocks ]; then stop_pid "$pid" "oclocks node"; fi
      done
    fi
  fi
  for pid in "${ETCD_PIDS[@]}"; do stop_pid "$pid" etcd; done
  wait 2>/dev/null
  if [ "${KEEP:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "starting a 3-node oclocks dev cluster in $WORK/oclocks"
"$OCLOCKS" dev --dir "$WORK/oclocks" >"$WORK/oclocks-dev.log" 2>&1 &
DEV_PID=$!

say "starting a 3-member etcd cluster on 127.0.0.1:$((ETCD_PORT_BASE + 1))-$((ETCD_PORT_BASE + 3))"
CLUSTER=
ETCD_ENDPOINTS=
for i in 1 2 3; do
  CLUSTER+="${CLUSTER:+,}m$i=http://127.0.0.1:$((ETCD_PORT_BASE + 10 + i))"
  ETCD_ENDPOINTS+="${ETCD_ENDPOINTS:+,}127.0.0.1:$((ETCD_PORT_BASE + i))"
done
for i in 1 2 3; do
  c=$((ETCD_PORT_BASE + i)) p=$((ETCD_PORT_BASE + 10 + i))
  etcd --name "m$i" --data-dir "$WORK/etcd-m$i" \
    --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "$CLUSTER" --initial-cluster-token bench-vs-etcd \
    --initial-cluster-state new --auto-compaction-mode=revision --auto-compaction-retention=10000 \
    --log-level=warn --logger=zap >"$WORK/etcd-m$i.log" 2>&1 &
  ETCD_PIDS+=($!)
done

# The dev cluster prints its banner once every node serves.
n=600
until grep -q "OpenCluster-Locks dev cluster" "$WORK/oclocks-dev.log" 2>/dev/null; do
  if ! kill -0 "$DEV_PID" 2>/dev/null || [ $n -eq 0 ]; then
    say "oclocks dev did not start:"; cat "$WORK/oclocks-dev.log" >&2; exit 1
  fi
  sleep 0.1; n=$((n - 1))
done
CLIENT_TOML=$WORK/oclocks/client.toml

# etcd: every member's /health says true.
etcd_healthy() {
  local reply
  reply=$( (exec 3<>/dev/tcp/127.0.0.1/"$1" &&
    printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3 && timeout 2 cat <&3) 2>/dev/null) || return 1
  [[ $reply == *'"health":"true"'* ]]
}
for i in 1 2 3; do
  n=300
  until etcd_healthy $((ETCD_PORT_BASE + i)); do
    if [ $n -eq 0 ]; then say "etcd m$i not healthy within 30 s:"; cat "$WORK/etcd-m$i.log" >&2; exit 1; fi
    sleep 0.1; n=$((n - 1))
  done
done
say "both clusters up: oclocks ($CLIENT_TOML), etcd ($ETCD_ENDPOINTS)"

# ---- alternate the benches ----
for run in $(seq 1 "$RUNS"); do
  say "run $run/$RUNS: oclocks"
  rc=0
  "$OCLOCKS" bench --config "$CLIENT_TOML" --label oclocks --runs 1 "${ARGS[@]}" \
    --out "$WORK/ours-$run.md" >/dev/null || rc=$?
  if [ $rc -eq 2 ]; then FAILED+=("oclocks run $run: exit 2 (SAFETY CHECK FAILED)")
  elif [ $rc -ne 0 ]; then FAILED+=("oclocks run $run: exit $rc"); fi
  say "run $run/$RUNS: etcd-3"
  rc=0
  "$LOCKBENCH" --backend "etcd-3=etcd://$ETCD_ENDPOINTS" --runs 1 "${ARGS[@]}" \
    --out "$WORK/etcd-$run.md" >/dev/null || rc=$?
  if [ $rc -ne 0 ]; then FAILED+=("etcd-3 run $run: exit $rc"); fi
done

# ---- report ----
make_report "$WORK" "$RUNS" >"$WORK/report.md"
cat "$WORK/report.md"
if [ -n "${OUT:-}" ]; then cp "$WORK/report.md" "$OUT"; say "report written to $OUT"; fi
[ ${#FAILED[@]} -eq 0 ]
