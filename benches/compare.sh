#!/usr/bin/env bash
# Side-by-side throughput: keygate vs HAProxy (and nginx as a plain proxy) in front of the
# same nginx upstream, driven by wrk on loopback. Prints requests/s per proxy and the ratio.
#
#   benches/compare.sh [seconds-per-run] [rounds]
#
# Both proxies do comparable work per request: check the Authorization header (HAProxy with
# an ACL on the exact value, keygate with its key lookup), drop it, add an identity header,
# forward on a pooled keep-alive upstream connection. Runs alternate so machine noise hits
# both; compare the ratio, not absolute numbers. Needs: wrk haproxy nginx-light.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
ROUNDS=${2:-3}
CONNS=${CONNS:-64}
for tool in wrk haproxy nginx; do
  command -v "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk haproxy nginx-light >/dev/null; break; }
done
cargo build --release -q
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

UP=18181 KG=18182 HA=18183 NG=18184
mkdir -p "$work/nginx/logs"
cat > "$work/nginx/nginx.conf" <<CONF
worker_processes 1;
error_log /dev/null;
pid $work/nginx/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP; keepalive 128; }
  server { listen 127.0.0.1:$UP; location / { return 200 "ok\n"; } }
  server {
    listen 127.0.0.1:$NG;
    location / {
      if (\$http_authorization != "Api-Key KEYVALUE") { return 401; }
      proxy_set_header Authorization "";
      proxy_set_header X-Api-Key-Id bench;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass http://up;
    }
  }
}
CONF

KEY=$(./target/release/keygate keys create --keys-file "$work/keys.yaml" --service-account sa-bench --scope bench.call 2>/dev/null)
sed -i "s/KEYVALUE/$KEY/" "$work/nginx/nginx.conf"
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off;' & pids+=($!)

cat > "$work/keygate.yaml" <<CONF
listen: 127.0.0.1:$KG
keys_file: keys.yaml
log_format: json
routes:
  - name: api
    path_prefix: /api/
    upstream: http://127.0.0.1:$UP
    scopes: [bench.call]
CONF
./target/release/keygate serve --config "$work/keygate.yaml" >/dev/null 2>&1 & pids+=($!)
KG_PID=$!

cat > "$work/haproxy.cfg" <<CONF
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
  bind 127.0.0.1:$HA
  acl has_key req.hdr(authorization) -m str "Api-Key $KEY"
  http-request deny deny_status 401 unless has_key
  http-request del-header authorization
  http-request set-header X-Api-Key-Id bench
  default_backend be
backend be
  server up 127.0.0.1:$UP
CONF
haproxy -f "$work/haproxy.cfg" -db >/dev/null 2>&1 & pids+=($!)
HA_PID=$!
sleep 1

ticks() { [ -n "${1:-}" ] && awk '{print $14 + $15}' "/proc/$1/stat" || echo 0; }
run() { # name port [pid] -> "requests/s cpu-us-per-request" (CPU only when a pid is given)
  local out t0 t1
  t0=$(ticks "${3:-}")
  out=$(wrk -t1 -c"$CONNS" -d"${SECS}s" -H "Authorization: Api-Key $KEY" "http://127.0.0.1:$2/api/x")
  t1=$(ticks "${3:-}")
  if echo "$out" | grep -q "Non-2xx"; then echo "$1 answered non-2xx:" >&2; echo "$out" >&2; exit 1; fi
  echo "$out" | awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" '
    /requests in/ {n = $1} /Requests\/sec/ {r = $2}
    END {printf "%s %.1f\n", r, (n > 0 ? d / hz * 1e6 / n : 0)}'
}
declare -A total
for name in keygate haproxy nginx; do total[$name]=""; done
for r in $(seq 1 "$ROUNDS"); do
  for spec in "keygate:$KG:$KG_PID" "haproxy:$HA:$HA_PID" "nginx:$NG:"; do
    IFS=: read -r name port pid <<< "$spec"
    read -r rps cpu <<< "$(run "$name" "$port" "$pid")"
    total[$name]="${total[$name]} $rps"
    if [ -n "$pid" ]; then
      printf 'round %d %-8s %10.0f req/s  %6.1f us CPU/request\n' "$r" "$name" "$rps" "$cpu"
    else
      printf 'round %d %-8s %10.0f req/s\n' "$r" "$name" "$rps"
    fi
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
kg=$(echo "${total[keygate]}" | median)
ha=$(echo "${total[haproxy]}" | median)
ng=$(echo "${total[nginx]}" | median)
printf '\nmedian req/s: keygate %.0f, haproxy %.0f, nginx %.0f\n' "$kg" "$ha" "$ng"
awk -v k="$kg" -v h="$ha" 'BEGIN { printf "keygate / haproxy = %.2f (target >= 1.10)\n", k / h }'
