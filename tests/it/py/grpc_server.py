"""A real gRPC server (grpcio) on 127.0.0.1:0 with raw-bytes methods; prints its port.

/test.Echo/Unary       returns the request reversed, and trailing metadata x-trailer: done
/test.Echo/Stream      returns the request N times (N = first byte)
Each call records whether an authorization header or identity headers arrived.
"""
import sys
from concurrent import futures

import grpc


def unary(request, context):
    md = dict(context.invocation_metadata())
    if "authorization" in md:
        context.abort(grpc.StatusCode.INTERNAL, "authorization reached the upstream")
    context.set_trailing_metadata((("x-trailer", "done"), ("x-seen-key-id", md.get("x-api-key-id", ""))))
    return request[::-1]


def stream(request, context):
    n = request[0] if request else 1
    for i in range(n):
        yield bytes([i]) + request


handler = grpc.method_handlers_generic_handler(
    "test.Echo",
    {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    },
)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
sys.stdin.read()
server.stop(0)
