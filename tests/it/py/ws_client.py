"""A real WebSocket client (websockets): sends two messages through the gateway, prints replies."""
import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus


async def main(url, key):
    out = {}
    headers = {"Authorization": f"Api-Key {key}"} if key else {}
    try:
        async with connect(url, additional_headers=headers, open_timeout=10) as ws:
            replies = []
            for m in ["one", "two"]:
                await ws.send(m)
                replies.append(await ws.recv())
            out["replies"] = replies
    except InvalidStatus as e:
        out["status"] = e.response.status_code
    print(json.dumps(out), flush=True)


asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""))
