#!/usr/bin/env python3
"""One key list for benches/compare.sh, written in every proxy's own form.

    genkeys.py COUNT OUTDIR [--peers]

Writes OUTDIR/keys.txt (the secrets, one a line: what wrk's Lua script cycles through),
OUTDIR/keygate-keys.yaml (sha256 hashes, keygate's key file) and, with --peers,
OUTDIR/haproxy.map (sha256 hex -> key id), OUTDIR/nginx-keys.map (the whole Authorization
value -> key id, for an nginx `map` include) and OUTDIR/envoy-credentials.json (the
api_key_auth filter's credential list, inlined into Envoy's YAML as a flow sequence).

Keys are real `kg_` keys (src/keys/format.rs): `kg_` + 32 base62 characters + the 6-character
base62 CRC32 of `kg_` + body, so keygate's checksum pass sees what production traffic has.
"""
import hashlib
import json
import secrets
import sys
import zlib
from pathlib import Path

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def checksum(prefixed_body: str) -> str:
    n = zlib.crc32(prefixed_body.encode())
    out = []
    for _ in range(6):
        out.append(BASE62[n % 62])
        n //= 62
    return "".join(reversed(out))


def make_key() -> str:
    body = "kg_" + "".join(secrets.choice(BASE62) for _ in range(32))
    return body + checksum(body)


def main() -> None:
    count, out = int(sys.argv[1]), Path(sys.argv[2])
    peers = "--peers" in sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    keys = [make_key() for _ in range(count)]
    ids = [f"k{i:06d}" for i in range(count)]
    hashes = [hashlib.sha256(k.encode()).hexdigest() for k in keys]
    (out / "keys.txt").write_text("".join(k + "\n" for k in keys))
    with open(out / "keygate-keys.yaml", "w") as f:
        f.write("keys:\n")
        for i, h in zip(ids, hashes):
            f.write(
                f"  - id: {i}\n    hash: sha256:{h}\n    service_account: sa-bench\n"
                "    scopes: [bench.call]\n    created_at: 2026-01-01T00:00:00Z\n"
            )
    if not peers:
        return
    (out / "haproxy.map").write_text("".join(f"{h} {i}\n" for i, h in zip(ids, hashes)))
    (out / "nginx-keys.map").write_text(
        "".join(f'"Api-Key {k}" {i};\n' for i, k in zip(ids, keys))
    )
    creds = [{"key": k, "client": i} for i, k in zip(ids, keys)]
    (out / "envoy-credentials.json").write_text(json.dumps(creds, separators=(",", ":")))


if __name__ == "__main__":
    main()
