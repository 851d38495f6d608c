#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: repeatable to about 0.5%
# on a shared, noisy machine where CPU seconds per request swing by half between runs. Use it
# to A/B two builds; read CPU-per-request ratios from benches/compare.sh.
#
#   benches/instructions.sh [seconds] [BIN ...]     (default: 8 s, target/release/keygate)
#   H2=1 benches/instructions.sh ...                  h2c downstream instead (h2load)
#
# Each binary (and HAProxy doing the same SHA-256 map check, when installed; HAPROXY=0 skips)
# runs under callgrind in front of one nginx upstream answering a tiny 200, with 1,000 keys and
# its access log on (json, to /dev/null). wrk -t1 -c16 cycles through every key: a 2 s warm-up,
# then the counters are zeroed, the measured run, and a dump. Printed: requests and user-space
# instructions per request (all threads; kernel time is not counted, and it is the same four
# socket syscalls per request for every proxy). Under valgrind SHA-256 runs its portable code
# (valgrind hides SHA-NI), which costs keygate about 3,500 instructions a request that real
# hardware does not spend. H2=1 drives h2c with prior knowledge instead: h2load -c16 -m10 with
# one of the keys (h2load sends fixed headers), HAProxy bound with `proto h2`; the upstream
# stays HTTP/1.1. UP_H2=1 makes the upstream HTTP/2 instead (nginx `listen ... http2`, an
# `h2c://` route, HAProxy `proto h2`). CG_KEEP=dir keeps each callgrind dump there, for
# callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-8}
shift || true
bins=("$@")
if [ "${#bins[@]}" -eq 0 ]; then
  cargo build --release -q
  bins=("${CARGO_TARGET_DIR:-target}/release/keygate")
fi
missing=()
command -v valgrind >/dev/null || missing+=(valgrind)
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v curl >/dev/null || missing+=(curl)
H2=${H2:-0}
UP_H2=${UP_H2:-0}
[ "$H2" = 0 ] || command -v h2load >/dev/null || missing+=(nghttp2-client)
if ((${#missing[@]})); then
  apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi
export PATH="$PATH:/usr/sbin"
BASE_PORT=${BASE_PORT:-18280}
UP=$((BASE_PORT + 1)) PX=$((BASE_PORT + 2))
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
python3 benches/compare/genkeys.py 1000 "$work/k" --peers >/dev/null
mkdir -p "$work/up"
cat >"$work/up/nginx.conf" <<CONF
worker_processes 1;
error_log /dev/null;
pid $work/up/nginx.pid;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  server { listen 127.0.0.1:$UP$([ "$UP_H2" = 0 ] || echo ' http2') backlog=4096; location / { return 200 "ok\n"; } } }
CONF
nginx -p "$work/up" -c "$work/up/nginx.conf" -g 'daemon off;' & pids+=($!)

load() { # seconds
  if [ "$H2" = 0 ]; then
    wrk -t1 -c16 -d"$1s" -s benches/compare/cycle.lua "http://127.0.0.1:$PX/api/x" -- "$work/k/keys.txt"
  else
    h2load -c16 -m10 -D "$1" -H "authorization: Api-Key $(head -1 "$work/k/keys.txt")" \
      "http://127.0.0.1:$PX/api/x"
  fi
}

measure() { # name command...
  local name=$1 vp n ir out
  shift
  rm -f "$work"/cg.*
  valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p" --dump-instr=no "$@" \
    >/dev/null 2>"$work/valgrind.log" &
  vp=$!
  pids+=("$vp")
  for _ in $(seq 1 150); do
    curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$PX/" && break
    sleep 0.2
  done
  load 2 >/dev/null 2>&1
  callgrind_control -z "$vp" >/dev/null
  out=$(load "$SECS" 2>&1)
  callgrind_control -d "$vp" >/dev/null
  kill "$vp" 2>/dev/null || true
  wait "$vp" 2>/dev/null || true
  if [ "$H2" = 0 ]; then
    n=$(awk '/requests in/{print $1}' <<<"$out")
    bad=$(grep "Non-2xx" <<<"$out" || true)
  else
    n=$(awk '/^requests:/{print $4}' <<<"$out")
    bad=$(grep -q " 0 4xx, 0 5xx" <<<"$out" || grep "^status codes" <<<"$out")
  fi
  if [ -n "$bad" ]; then
    echo "$name: non-2xx answers, not measured: $bad" >&2
    return 1
  fi
  # The dump taken after zeroing is the file with part number 1.
  ir=$(awk '/^(summary|totals):/{print $2; exit}' "$work"/cg.*.1)
  if [ -n "${CG_KEEP:-}" ]; then
    mkdir -p "$CG_KEEP" && cp "$work"/cg.*.1 "$CG_KEEP/$(tr -c 'A-Za-z0-9.\n' _ <<<"$name").cg"
  fi
  printf '%-40s requests %7d   instructions/request %8.0f\n' "$name" "$n" "$(python3 -c "print($ir / $n)")"
}

for b in "${bins[@]}"; do
  cat >"$work/keygate.yaml" <<CONF
listen: 127.0.0.1:$PX
keys_file: $work/k/keygate-keys.yaml
log_format: json
routes:
  - name: api
    path_prefix: /api/
    upstream: $([ "$UP_H2" = 0 ] && echo http || echo h2c)://127.0.0.1:$UP
    scopes: [bench.call]
CONF
  KEYGATE_WORKERS=2 measure "keygate ($b)" "$b" serve --config "$work/keygate.yaml"
done
if [ "${HAPROXY:-1}" = 1 ] && command -v haproxy >/dev/null; then
  cat >"$work/haproxy.cfg" <<CONF
global
  nbthread 2
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:$PX$([ "$H2" = 0 ] || echo ' proto h2')
  http-request set-var(txn.key_id) req.fhdr(authorization),word(2,' '),sha2(256),hex,lower,map($work/k/haproxy.map) if { req.fhdr(authorization),word(1,' ') -m str Api-Key }
  http-request deny deny_status 401 unless { var(txn.key_id) -m found }
  http-request del-header authorization
  http-request set-header X-Api-Key-Id %[var(txn.key_id)]
  default_backend be
backend be
  server up 127.0.0.1:$UP$([ "$UP_H2" = 0 ] || echo ' proto h2')
CONF
  measure "haproxy $(haproxy -v | awk 'NR==1{print $3}')" haproxy -f "$work/haproxy.cfg" -db
fi
