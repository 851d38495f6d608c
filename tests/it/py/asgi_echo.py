"""A tiny ASGI app for hypercorn, a real server that accepts `Upgrade: h2c`."""


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = f"{scope['http_version']} {scope['path']}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
