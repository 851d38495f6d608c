#!/usr/bin/env bash
# Memory with many keys: start keygate on a large key file, drive load, rewrite the key file
# three times, and report peak RSS (VmHWM), RSS at each step and the time to the first 200
# and to each reload being seen. A measurement, not a test: targets are read off its output.
#
#   benches/memory.sh [keys] [load-seconds]      (defaults: 100000 keys, 5 s of wrk)
#
# Each reload adds one key; it counts as seen when that key first gets a 200. wrk keeps
# running during the reloads, so in-flight requests hold old snapshots as they do in
# production. The access log stays on (JSON to stdout, sent to /dev/null; STALLED_LOG=1 sends
# it to a pipe nobody reads instead, to see what a full log queue holds). KEYGATE_BIN=path
# measures another binary with the same script. Needs: wrk, nginx (installed with apt-get
# when missing), python3, curl.
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${1:-100000}
SECS=${2:-5}
CONNS=${CONNS:-64}
for tool in wrk nginx curl; do
  command -v "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk nginx-light curl >/dev/null; break; }
done
# KEYGATE_BIN measures another build (an older commit, say) with the same script.
BIN=${KEYGATE_BIN:-./target/release/keygate}
[ -n "${KEYGATE_BIN:-}" ] || cargo build --release -q
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

UP=18381 KG=18382
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

# Keys as `keygate keys create` writes them (id, hash, account, scopes, created_at; some with
# a description), 200 service accounts, a handful of scope sets. Keys issued elsewhere are
# looked up by hash, so the file is written directly: bench-key-<i> is key k<i>'s secret.
python3 - "$work" "$KEYS" <<'PY'
import hashlib, sys
work, n = sys.argv[1], int(sys.argv[2])
scope_sets = ["[bench.call]", "[bench.call, bench.read]", "[bench.*]", "[bench.call, other.write, other.read]"]
with open(f"{work}/keys.base", "w") as f:
    f.write("# keygate key file: hashes only, written by `keygate keys`.\nkeys:\n")
    for i in range(n):
        h = hashlib.sha256(f"bench-key-{i}".encode()).hexdigest()
        f.write(f"  - id: k{i}\n    hash: sha256:{h}\n    service_account: sa-{i % 200}\n"
                f"    scopes: {scope_sets[i % len(scope_sets)]}\n")
        if i % 10 == 0:
            f.write(f"    description: \"nightly job {i}\"\n")
        f.write("    created_at: 2026-11-29T12:00:00Z\n")
PY
cp "$work/keys.base" "$work/keys.yaml"
cat > "$work/keygate.yaml" <<CONF
listen: 127.0.0.1:$KG
keys_file: keys.yaml
state_file: state.json
log_format: json
routes:
  - name: api
    path_prefix: /
    upstream: http://127.0.0.1:$UP
    scopes: [bench.call]
CONF
cat > "$work/keys.lua" <<LUA
local i = 0
request = function()
  i = (i + 1) % $KEYS
  return wrk.format(nil, nil, { ["Authorization"] = "Api-Key bench-key-" .. i })
end
LUA
for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$UP/" && break; sleep 0.1; done

now() { date +%s.%N; }
# Polls until `key` gets a 200 (at most 30 s, every 10 ms); prints the seconds since `since`.
seen() {
  local key=$1 since=$2 code
  for _ in $(seq 1 3000); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Api-Key $key" "http://127.0.0.1:$KG/" || true)
    if [ "$code" = 200 ]; then awk -v a="$since" -v b="$(now)" 'BEGIN {printf "%.2f", b - a}'; return; fi
    sleep 0.01
  done
  echo "key $key never got a 200" >&2; exit 1
}
status() { awk -v f="$2" '$1 == f":" {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

t0=$(now)
# STALLED_LOG=1: the access log goes to a pipe nobody reads (a log shipper that stopped), so
# the writer blocks and the queue fills to its cap; what each queued entry holds shows in RSS.
log_to=/dev/null
if [ "${STALLED_LOG:-0}" = 1 ]; then
  mkfifo "$work/log.fifo"
  sleep 600 <"$work/log.fifo" & pids+=($!)
  log_to=$work/log.fifo
fi
"$BIN" serve --config "$work/keygate.yaml" >"$log_to" 2>"$work/keygate.err" & pids+=($!)
KG_PID=$!
first=$(seen bench-key-1 "$t0")
echo "start: first 200 after ${first} s; RSS $(status $KG_PID VmRSS) MiB, peak $(status $KG_PID VmHWM) MiB"

out=$(wrk -t2 -c"$CONNS" -d"${SECS}s" -s "$work/keys.lua" "http://127.0.0.1:$KG/")
non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
[ -z "$non2xx" ] || { echo "load: $non2xx non-2xx answers" >&2; exit 1; }
rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
echo "load: $rps req/s for ${SECS} s; RSS $(status $KG_PID VmRSS) MiB, peak $(status $KG_PID VmHWM) MiB"
# Workers hand freed pages back after a quiet second (ops::trim): what a sidecar settles at.
sleep 2.5
settled=$(status $KG_PID VmRSS)
echo "load + 2.5 s quiet: RSS $settled MiB"

# Load keeps running while the key file is replaced (atomically, as `keygate keys` does).
wrk -t1 -c16 -d60s -s "$work/keys.lua" "http://127.0.0.1:$KG/" >/dev/null & WRK_PID=$!
pids+=($WRK_PID)
reloads=()
for r in 1 2 3; do
  { cat "$work/keys.base"
    for j in $(seq 1 "$r"); do
      h=$(printf 'reload-key-%d' "$j" | sha256sum | cut -d' ' -f1)
      printf '  - id: reload-%d\n    hash: sha256:%s\n    service_account: sa-reload\n    scopes: [bench.call]\n' "$j" "$h"
    done
  } > "$work/keys.next"
  t=$(now)
  mv "$work/keys.next" "$work/keys.yaml"
  took=$(seen "reload-key-$r" "$t")
  reloads+=("$took")
  echo "reload $r: seen after ${took} s; RSS $(status $KG_PID VmRSS) MiB, peak $(status $KG_PID VmHWM) MiB"
done
kill "$WRK_PID" 2>/dev/null || true
wait "$WRK_PID" 2>/dev/null || true
sleep 2.5
# LATER=seconds waits that long more and measures again: workers and the reload thread
# collect on their own, other threads return freed pages only as they allocate again.
if [ "${LATER:-0}" -gt 0 ]; then
  echo "2.5 s after the last reload: RSS $(status $KG_PID VmRSS) MiB"
  sleep "$LATER"
  echo "$LATER s more: RSS $(status $KG_PID VmRSS) MiB"
fi
final=$(status $KG_PID VmRSS) peak=$(status $KG_PID VmHWM)
# Heap and stacks versus keygate's own code paged in from the binary (shared with any other
# keygate on the node, and dropped by the kernel first under pressure).
echo "final RSS: $(status $KG_PID RssAnon) MiB anonymous, $(status $KG_PID RssFile) MiB file-backed"
echo
echo "| $KEYS keys | measured | target |"
echo "|---|---|---|"
echo "| RSS 2.5 s after load | $settled MiB | < 16 MiB at 1,000 keys |"
echo "| peak RSS (VmHWM) over start + 3 reloads | $peak MiB | < 96 MiB |"
echo "| RSS after load and reloads | $final MiB | < 64 MiB |"
echo "| start to first 200 | $first s | < 1 s |"
echo "| reload seen (3 reloads) | ${reloads[*]} s | < 1 s each |"
