#!/usr/bin/env bash
# Builds keygate's container image offline: a static binary built on the host, packed FROM scratch.
# deploy/Dockerfile is the same image for machines that reach a registry; this script is for
# machines that do not (no base image to pull), and it reuses the host's cargo cache.
#
#   deploy/build-image.sh [TAG]        (default tag: localhost/keygate:dev)
#
# Needs podman (Debian: apt-get install podman runc). Prints the image tag on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

tag="${1:-localhost/keygate:dev}"
target=x86_64-unknown-linux-gnu
# A target dir of its own: crt-static changes every artifact's hash, and sharing target/ would
# evict the debug build the tests use. --target keeps the flag off build scripts and proc-macros.
static_dir="${KEYGATE_STATIC_TARGET_DIR:-$PWD/target/static}"

# glibc's getaddrinfo in a static binary cannot load NSS modules: upstream names resolve from
# /etc/hosts (files) and DNS only through what glibc builds in. README's Deploy section says so.
RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_STRIP=symbols \
  CARGO_TARGET_DIR="$static_dir" \
  cargo build --release --locked --target "$target" --bin keygate

bin="$static_dir/$target/release/keygate"
# static-pie binaries still have a dynamic section, so look for needed libraries, not for one.
if readelf -d "$bin" | grep -q "(NEEDED)"; then
  echo "build-image: $bin is dynamically linked; refusing to pack it into a scratch image" >&2
  exit 1
fi

if [ "${KEYGATE_BUILD_ONLY_BINARY:-}" = 1 ]; then
  echo "$bin"
  exit 0
fi

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
cp "$bin" "$ctx/keygate"
mkdir -p "$ctx/state"
# scratch has no /etc/passwd: the numeric uid is what runAsNonRoot checks, and /etc/hosts comes
# from the runtime. /var/lib/keygate is where state_file lives (a volume in every deployment).
cat >"$ctx/Containerfile" <<'CF'
FROM scratch
COPY --chmod=0555 keygate /usr/local/bin/keygate
COPY --chown=10001:10001 state /var/lib/keygate
USER 10001:10001
ENV PATH=/usr/local/bin
EXPOSE 8080 9090
ENTRYPOINT ["keygate"]
CMD ["serve", "--config", "/etc/keygate/keygate.yaml"]
CF

podman ${PODMAN_OPTS:-} build --quiet -t "$tag" -f "$ctx/Containerfile" "$ctx" >/dev/null
echo "$tag"
