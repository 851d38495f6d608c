"""A real gRPC client (grpcio): calls through the gateway and prints one JSON line per case."""
import json
import sys

import grpc

target, key = sys.argv[1], sys.argv[2]
channel = grpc.insecure_channel(target)
auth = (("authorization", f"Api-Key {key}"),)
results = {}


def code(e):
    return e.code().name


unary = channel.unary_unary("/test.Echo/Unary")
try:
    resp, call = unary.with_call(b"hello", metadata=auth, timeout=10)
    results["unary"] = resp.decode()
    results["trailers"] = dict(call.trailing_metadata())
except grpc.RpcError as e:
    results["unary"] = code(e)

stream = channel.unary_stream("/test.Echo/Stream")
try:
    results["stream"] = [m.hex() for m in stream(b"\x03ab", metadata=auth, timeout=10)]
except grpc.RpcError as e:
    results["stream"] = code(e)

for name, md, method in [
    ("missing", (), "/test.Echo/Unary"),
    ("invalid", (("authorization", "Api-Key kg_nope"),), "/test.Echo/Unary"),
    ("scope", auth, "/admin.Svc/Call"),
    ("noroute", auth, "/nothing.Here/Call"),
    ("down", auth, "/down.Svc/Call"),
]:
    try:
        channel.unary_unary(method)(b"x", metadata=md, timeout=10)
        results[name] = "OK"
    except grpc.RpcError as e:
        results[name] = code(e)

print(json.dumps(results), flush=True)
