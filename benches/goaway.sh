#!/usr/bin/env bash
# Requests lost when an HTTP/2 upstream ends its connections: keygate, HAProxy and Envoy in
# front of an nginx `listen ... http2` upstream left at nginx's default `keepalive_requests`
# (1,000), which ends every connection with a GOAWAY after that many requests. Streams the
# proxy had already sent above the GOAWAY's last-stream-id were never processed; RFC 9113 8.7
# lets a client send them again, on any method. Prints one markdown table of what each proxy
# answered. This measures correctness, not speed: compare.sh pins keepalive_requests high so
# these failures do not distort its throughput numbers.
#
#   benches/goaway.sh [requests]          (default 100000 per proxy and method)
#
# Environment: KEEPALIVE_REQUESTS [1000] (nginx's default), ENVOY [1], BASE_PORT [18480],
# KEYGATE_BIN (else `cargo build --release`).
#
# The load is h2load -c16 -m10 over h2c, a GET and then a POST with a 2.7 KB body. keygate
# checks a key; HAProxy and Envoy forward without one, since the key check does not touch the
# upstream side. HAProxy runs twice: as shipped, and with `retry-on all-retryable-errors` and
# `option http-buffer-request`, its opt-in for this (which also resends after a 502-504 or a
# response timeout, when the upstream may have processed the request). Envoy runs as shipped,
# with no retry policy.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
KEEPALIVE_REQUESTS=${KEEPALIVE_REQUESTS:-1000}
ENVOY=${ENVOY:-1}
BASE_PORT=${BASE_PORT:-18480}
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

missing=()
command -v haproxy >/dev/null || missing+=(haproxy)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
  apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi
export PATH="$PATH:/usr/sbin"
# shellcheck source=benches/compare/envoy.sh
. benches/compare/envoy.sh
ENVOY_BIN=""
if [ "$ENVOY" = 1 ]; then
  ENVOY_BIN=$(envoy_binary)
  [ -n "$ENVOY_BIN" ] || echo "note: Envoy could not be installed; its rows are skipped" >&2
fi
if [ -n "${KEYGATE_BIN:-}" ]; then
  KG_BIN=$KEYGATE_BIN
else
  cargo build --release -q
  KG_BIN=${CARGO_TARGET_DIR:-target}/release/keygate
fi

UP=$((BASE_PORT + 1)) KG=$((BASE_PORT + 2)) HA=$((BASE_PORT + 3)) HR=$((BASE_PORT + 4))
EN=$((BASE_PORT + 5))
for p in $UP $KG $HA $HR $EN; do
  [ -z "$(ss -Htln "sport = :$p" 2>/dev/null)" ] || die "port $p is in use; set BASE_PORT"
done
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

python3 benches/compare/genkeys.py 1 "$work/k" >/dev/null
KEY=$(head -n 1 "$work/k/keys.txt")
head -c 2700 /dev/zero | tr '\0' x >"$work/body"

mkdir -p "$work/up"
cat >"$work/up/nginx.conf" <<CONF
worker_processes 1;
error_log /dev/null;
pid $work/up/nginx.pid;
events { worker_connections 4096; }
http { access_log off; keepalive_requests $KEEPALIVE_REQUESTS;
  server { listen 127.0.0.1:$UP http2 backlog=4096;
    location / { return 200 "ok\n"; } } }
CONF
nginx -p "$work/up" -c "$work/up/nginx.conf" -g 'daemon off;' & pids+=($!)

cat >"$work/keygate.yaml" <<CONF
listen: 127.0.0.1:$KG
keys_file: $work/k/keygate-keys.yaml
log_format: json
routes:
  - name: api
    path_prefix: /
    upstream: h2c://127.0.0.1:$UP
    scopes: [bench.call]
CONF
"$KG_BIN" serve --config "$work/keygate.yaml" >"$work/keygate.log" 2>&1 & pids+=($!)

haproxy_cfg() { # port extra-backend-lines
  cat <<CONF
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
  bind 127.0.0.1:$1 proto h2
  default_backend be
backend be
$2
  server up 127.0.0.1:$UP proto h2
CONF
}
haproxy_cfg "$HA" "" >"$work/haproxy.cfg"
haproxy_cfg "$HR" "  retry-on all-retryable-errors
  option http-buffer-request" >"$work/haproxy-retry.cfg"
haproxy -f "$work/haproxy.cfg" -db >/dev/null 2>&1 & pids+=($!)
haproxy -f "$work/haproxy-retry.cfg" -db >/dev/null 2>&1 & pids+=($!)

if [ -n "$ENVOY_BIN" ]; then
  cat >"$work/envoy.yaml" <<CONF
static_resources:
  listeners:
  - address: {socket_address: {address: 127.0.0.1, port_value: $EN}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: in
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{match: {prefix: "/"}, route: {cluster: up}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: up
    type: STATIC
    load_assignment:
      cluster_name: up
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $UP}}}}]}]
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
CONF
  "$ENVOY_BIN" -c "$work/envoy.yaml" --concurrency 2 --disable-hot-restart -l error \
    >"$work/envoy.log" 2>&1 & pids+=($!)
fi

wait_ok() { # seconds url curl-args... -> 0 once the url answers 200 over h2c
  local deadline=$((SECONDS + $1)) url=$2
  shift 2
  while [ $SECONDS -lt $deadline ]; do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 --http2-prior-knowledge "$@" "$url")" = 200 ] &&
      return 0
    sleep 0.1
  done
  return 1
}
wait_ok 10 "http://127.0.0.1:$UP/" || die "the nginx upstream did not start"
wait_ok 30 "http://127.0.0.1:$KG/x" -H "Authorization: Api-Key $KEY" || die "keygate did not start"
wait_ok 10 "http://127.0.0.1:$HA/x" || die "haproxy did not start"
wait_ok 10 "http://127.0.0.1:$HR/x" || die "haproxy (retry-on) did not start"
[ -z "$ENVOY_BIN" ] || wait_ok 20 "http://127.0.0.1:$EN/x" || die "envoy did not start"

printf '%s requests per proxy and method, h2load -c16 -m10, nginx upstream with keepalive_requests %s\n\n' \
  "$N" "$KEEPALIVE_REQUESTS"
echo "| proxy | method | 2xx | 5xx | reset or errored | lost |"
echo "|---|---|---|---|---|---|"
row() { # name port method header-args...
  local name=$1 port=$2 method=$3 out ok five err
  shift 3
  local args=(-c16 -m10 -n "$N" "$@")
  [ "$method" = GET ] || args+=(-d "$work/body")
  out=$(timeout 300 h2load "${args[@]}" "http://127.0.0.1:$port/x" 2>&1) || true
  ok=$(awk '/^status codes:/{print $3}' <<<"$out")
  five=$(awk '/^status codes:/{print $9}' <<<"$out")
  err=$(awk '/^requests:/{print $12}' <<<"$out")
  [ -n "$ok" ] || die "h2load against $name printed no status line: $out"
  python3 -c "n=$N; ok=$ok; print(f'| $name | $method | {ok} | $five | $err | {(n-ok)*100/n:.2f}% |')"
}
for m in GET POST; do
  row keygate "$KG" "$m" -H "authorization: Api-Key $KEY"
  row "haproxy $(haproxy -v | awk 'NR==1{print $3}')" "$HA" "$m"
  row "haproxy, retry-on all-retryable-errors" "$HR" "$m"
  [ -z "$ENVOY_BIN" ] || row "envoy $("$ENVOY_BIN" --version | grep -o '[0-9]*\.[0-9]*\.[0-9]*' | head -1)" "$EN" "$m"
done
