#!/usr/bin/env bash
# CI: builds the container image offline and proves it serves: the example config mounted
# read-only, one allowed and one rejected request, an upstream named through /etc/hosts and one
# named through DNS (the static binary has no NSS modules). Prints the image size.
#
# Where containers cannot run (no podman, no usable runtime), it says so, runs the same checks
# against the static binary on the host, and exits 0 if those pass. Idempotent; bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'ci-image: %s\n' "$*"; }
die() { say "FAIL: $*"; exit 1; }
max_mb=20
tag=localhost/keygate:ci

work="$(mktemp -d)"
pids=()
name="keygate-ci-$$"
cleanup() {
  podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# podman as the issue found it works here: Debian's runc (crun fails on this kernel's cgroup
# layout), no default ulimits, cgroupfs, events in a file (no journald in CI).
if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1; then
  say "installing podman and runc"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq podman runc) >/dev/null 2>&1 \
    || say "could not install podman (no container run on this machine)"
fi
cat >"$work/containers.conf" <<'CONF'
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
CONF
export CONTAINERS_CONF="$work/containers.conf"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The upstream: plain files over HTTP, answering 200 for /hello.txt and /health.
mkdir -p "$work/www"
echo hello >"$work/www/hello.txt"
echo ok >"$work/www/health"
up_port="$(free_port)"
python3 -m http.server "$up_port" --bind 127.0.0.1 --directory "$work/www" >/dev/null 2>&1 &
pids+=($!)

# A one-answer DNS server on 127.0.0.1:53 (resolv.conf cannot name another port): every A
# query gets 127.0.0.1. Only where port 53 is free; otherwise the DNS check is skipped, said so.
dns_name=""
cat >"$work/dns.py" <<'PY'
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
while True:
    q, peer = s.recvfrom(512)
    qid, end = q[:2], 12
    while q[end]:
        end += q[end] + 1
    question = q[12:end + 5]
    qtype = struct.unpack(">H", q[end + 1:end + 3])[0]
    answers = b""
    if qtype == 1:
        answers = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 5, 4) + socket.inet_aton("127.0.0.1")
    head = qid + b"\x81\x80" + struct.pack(">HHHH", 1, 1 if answers else 0, 0, 0)
    s.sendto(head + question + answers, peer)
PY
if python3 - <<'PY' 2>/dev/null
import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 53))
PY
then
  python3 "$work/dns.py" >/dev/null 2>&1 &
  pids+=($!)
  dns_name="upstream.keygate-ci.test"
  echo "nameserver 127.0.0.1" >"$work/resolv.conf"
else
  say "port 53 is taken here: the DNS-named upstream check is skipped (the /etc/hosts one runs)"
fi

# The example config, on free ports, with its upstreams named rather than numbered.
port="$(free_port)"
cfg="$work/etc"
mkdir -p "$cfg" "$work/state"
cp config/keys.yaml "$cfg/keys.yaml"
sed -e "s#^listen: .*#listen: 127.0.0.1:$port#" \
    -e "s#http://127.0.0.1:9001#http://localhost:$up_port#" \
    config/keygate.yaml >"$cfg/keygate.yaml"
echo "state_file: /var/lib/keygate/keys-state.json" >>"$cfg/keygate.yaml"
if [ -n "$dns_name" ]; then
  # Only the public health route goes through DNS, so a resolver failure shows as its 502.
  python3 - "$cfg/keygate.yaml" "$dns_name" "$up_port" <<'PY'
import sys
path, name, port = sys.argv[1:]
text = open(path).read()
head, sep, tail = text.rpartition("  - name: health")
tail = tail.replace(f"http://localhost:{port}", f"http://{name}:{port}")
open(path, "w").write(head + sep + tail)
PY
fi
grep -q "localhost:$up_port" "$cfg/keygate.yaml" || die "example config changed shape: no upstream rewritten"
# As a Secret mount with fsGroup would be: group-readable, nothing for others.
chgrp 10001 "$cfg/keys.yaml" && chmod 0640 "$cfg/keys.yaml"
chown 10001:10001 "$work/state"
example_key="$(sed -n 's/^KEY=\(kg_[A-Za-z0-9]*\).*/\1/p' README.md | head -1)"
[ -n "$example_key" ] || die "README no longer shows the example key"

check_requests() {
  local base="http://127.0.0.1:$port" code
  for _ in $(seq 1 100); do
    curl -s -o /dev/null --max-time 1 "$base/" && break
    sleep 0.2
  done
  code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H "Authorization: Api-Key $example_key" "$base/ydb/hello.txt")"
  [ "$code" = 200 ] || die "allowed request: $code, want 200 (upstream via /etc/hosts name localhost)"
  code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$base/ydb/hello.txt")"
  [ "$code" = 401 ] || die "request without a key: $code, want 401"
  code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H "Authorization: Api-Key kg_wrongwrongwrongwrongwrongwrong000000" "$base/ydb/hello.txt")"
  [ "$code" = 401 ] || die "request with a wrong key: $code, want 401"
  if [ -n "$dns_name" ]; then
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$base/health")"
    [ "$code" = 200 ] || die "upstream named through DNS ($dns_name): $code, want 200"
  fi
  say "allowed 200, rejected 401${dns_name:+, DNS-named upstream 200}"
}

# CI checks that the image builds, runs and stays small, not how fast it serves: without LTO,
# with more codegen units and opt-level 1 the static build takes about 3.5 minutes instead of
# 5. Release images come from deploy/build-image.sh or the Dockerfile with Cargo.toml's profile.
export CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_OPT_LEVEL=1

say "building the static binary and the image"
if command -v podman >/dev/null 2>&1 && timeout 120 podman info >/dev/null 2>&1; then
  timeout 1500 deploy/build-image.sh "$tag" >/dev/null || die "image build failed"
  size="$(podman image inspect --format '{{.Size}}' "$tag")"
  say "image $tag: $((size / 1024)) KiB"
  [ "$size" -lt $((max_mb * 1000 * 1000)) ] || die "image is over $max_mb MB"
  podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
  dns_mount=()
  [ -n "$dns_name" ] && dns_mount=(-v "$work/resolv.conf:/etc/resolv.conf:ro")
  if timeout 60 podman run -d --name "$name" --network host \
       -v "$cfg:/etc/keygate:ro" -v "$work/state:/var/lib/keygate" "${dns_mount[@]}" \
       "$tag" >"$work/run.log" 2>&1; then
    if ! (check_requests); then
      podman logs "$name" 2>&1 | tail -20
      exit 1
    fi
    timeout 60 podman stop -t 10 "$name" >/dev/null
    status="$(podman inspect --format '{{.State.ExitCode}}' "$name")"
    [ "$status" = 0 ] || die "container exited $status on SIGTERM, want 0"
    say "ok: the image ran and served"
    exit 0
  fi
  say "cannot run containers on this machine: $(tail -1 "$work/run.log")"
else
  say "podman does not work on this machine: the image is not built here"
  KEYGATE_BUILD_ONLY_BINARY=1 timeout 1500 deploy/build-image.sh >/dev/null || die "static build failed"
fi
# The same checks against the static binary on the host (DNS through the host's resolv.conf
# cannot be pointed at the test server without a container, so that check is off here).
dns_name=""
sed -i "s#http://upstream.keygate-ci.test:#http://localhost:#" "$cfg/keygate.yaml"
sed -i "s#/var/lib/keygate/#$work/state/#" "$cfg/keygate.yaml"
bin="${KEYGATE_STATIC_TARGET_DIR:-$PWD/target/static}/x86_64-unknown-linux-gnu/release/keygate"
"$bin" serve --config "$cfg/keygate.yaml" >/dev/null 2>"$work/serve.log" &
pids+=($!)
(check_requests) || { tail -20 "$work/serve.log"; exit 1; }
say "ok: static binary served (container run checked nowhere on this machine)"
