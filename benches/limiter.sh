#!/usr/bin/env bash
# What the key policy costs: the same gateway, 10,000 keys, with and without a rate limit and
# a quota on every key, driven by wrk cycling through all the keys (so every request touches
# a different key's cells). Rounds alternate so machine noise hits both; the measure is
# keygate's CPU time per request (steadier than req/s on a shared machine), and req/s.
#
#   benches/limiter.sh [seconds-per-run] [rounds]
#
# Needs: wrk, nginx (installed with apt-get when missing), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
ROUNDS=${2:-3}
CONNS=${CONNS:-64}
KEYS=${KEYS:-10000}
for tool in wrk nginx; do
  command -v "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk nginx-light >/dev/null; break; }
done
cargo build --release -q
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

UP=18281 PLAIN=18282 LIMITED=18283
mkdir -p "$work/nginx/logs"
cat > "$work/nginx/nginx.conf" <<CONF
worker_processes 1;
error_log /dev/null;
pid $work/nginx/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP; location / { return 200 "ok\n"; } }
}
CONF
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off;' & pids+=($!)

# Keys issued elsewhere (any string) are looked up by hash, so the file is written directly.
python3 - "$work" "$KEYS" <<'PY'
import hashlib, sys
work, n = sys.argv[1], int(sys.argv[2])
for name, extra in [("plain", ""), ("limited", "    rate_limit: 1000000/s\n    quota: 1000000000/day\n")]:
    with open(f"{work}/{name}.yaml", "w") as f:
        f.write("keys:\n")
        for i in range(n):
            h = hashlib.sha256(f"bench-key-{i}".encode()).hexdigest()
            f.write(f"  - id: k{i}\n    hash: sha256:{h}\n    service_account: sa-{i % 50}\n"
                    f"    scopes: [bench.call]\n{extra}")
PY
for name in plain limited; do
  port=$([ $name = plain ] && echo $PLAIN || echo $LIMITED)
  cat > "$work/$name-keygate.yaml" <<CONF
listen: 127.0.0.1:$port
keys_file: $name.yaml
state_file: $name-state.json
log_format: json
routes:
  - name: api
    path_prefix: /
    upstream: http://127.0.0.1:$UP
    scopes: [bench.call]
CONF
  ./target/release/keygate serve --config "$work/$name-keygate.yaml" >/dev/null 2>&1 & pids+=($!)
  eval "PID_$name=$!"
done
cat > "$work/keys.lua" <<LUA
local i = 0
request = function()
  i = (i + 1) % $KEYS
  return wrk.format(nil, nil, { ["Authorization"] = "Api-Key bench-key-" .. i })
end
LUA
for port in $UP $PLAIN $LIMITED; do
  for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
done
code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Api-Key bench-key-1' "http://127.0.0.1:$LIMITED/")
[ "$code" = 200 ] || { echo "limited gateway answered $code" >&2; exit 1; }

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
declare -A rps cpu
for round in $(seq 1 "$ROUNDS"); do
  for name in plain limited; do
    pid_var=PID_$name; pid=${!pid_var}
    port=$([ $name = plain ] && echo $PLAIN || echo $LIMITED)
    before=$(ticks "$pid")
    out=$(wrk -t2 -c"$CONNS" -d"${SECS}s" -s "$work/keys.lua" "http://127.0.0.1:$port/")
    after=$(ticks "$pid")
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    r=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
    [ -z "$non2xx" ] || { echo "$name: $non2xx non-2xx answers" >&2; exit 1; }
    us=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$reqs" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
    echo "round $round $name: $r req/s, $us us CPU/request"
    rps[$name]+="$r "
    cpu[$name]+="$us "
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
p_r=$(echo "${rps[plain]}" | median) l_r=$(echo "${rps[limited]}" | median)
p_c=$(echo "${cpu[plain]}" | median) l_c=$(echo "${cpu[limited]}" | median)
echo
echo "| $KEYS keys, wrk -t2 -c$CONNS, ${SECS}s x $ROUNDS | req/s (median) | CPU us/request (median) |"
echo "|---|---|---|"
echo "| no limits | $p_r | $p_c |"
echo "| rate_limit + quota on every key | $l_r | $l_c |"
awk -v a="$p_r" -v b="$l_r" -v c="$p_c" -v d="$l_c" \
  'BEGIN {printf "| limited / plain | %.3fx | %.3fx |\n", b / a, d / c}'
