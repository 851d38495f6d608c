"""A real WebSocket echo server (websockets) on 127.0.0.1:0; prints its port."""
import asyncio

from websockets.asyncio.server import serve


async def echo(ws):
    seen = ws.request.headers.get("x-api-key-id", "")
    leaked = "authorization" in ws.request.headers
    async for msg in ws:
        await ws.send(f"{msg}|{seen}|{'leaked' if leaked else 'clean'}")


async def main():
    async with serve(echo, "127.0.0.1", 0) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()


asyncio.run(main())
