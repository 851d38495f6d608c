#!/usr/bin/env bash
# Longer soak of the hardening suite: KEYGATE_SOAK (default 10) multiplies the fault count
# (10,000 -> 100,000 upstream faults) and the reload storm (4 s -> 40 s at 100 rewrites/s),
# and the hostile-input and slow-client cases run alongside. Prints file-descriptor and
# memory figures; any lost, failed or wrongly authorized request fails the run.
#
#   benches/soak.sh [factor]
set -euo pipefail
cd "$(dirname "$0")/.."
export KEYGATE_SOAK=${1:-10}
python3 -c "import grpc, websockets" 2>/dev/null || python3 -m pip install -q grpcio websockets
cargo test --release --test it -- faults:: hostile:: --nocapture --test-threads=1 2>&1 \
  | grep -E '^(faults:|reload storm:|test |test result)' 
