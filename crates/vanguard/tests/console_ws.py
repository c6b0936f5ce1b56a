"""A peer check of the daemon's websocket console: Python's `websockets` library (Debian's
python3-websockets) attaches to a VM running the test guest's `echo` scenario over the daemon's
Unix socket, types a line as a binary message and `quit` as a text message, and expects the
echo as binary messages and, when the guest powers off, a close frame 1000 "the VM stopped".

usage: console_ws.py SOCKET VM
"""
import asyncio
import sys

import websockets


async def main(socket, name):
    uri = f"ws://vanguard/v1/vms/{name}/console/ws"
    async with websockets.unix_connect(socket, uri) as ws:
        seen = b""

        async def until(text):
            nonlocal seen
            while text not in seen:
                message = await asyncio.wait_for(ws.recv(), 20)
                if not isinstance(message, bytes):
                    raise AssertionError(f"console output came as text: {message!r}")
                seen += message

        await until(b"echo: ready")
        await ws.send(b"from-python\n")
        await until(b"echo: from-python")
        await ws.send("quit\n")
        try:
            while True:
                seen += await asyncio.wait_for(ws.recv(), 20)
        except websockets.ConnectionClosedOK as closed:
            frame = closed.rcvd
            if frame is None or frame.code != 1000 or frame.reason != "the VM stopped":
                raise AssertionError(f"closed with {frame}")
        if b"echo: done" not in seen:
            raise AssertionError(f"no 'echo: done' in {seen!r}")
    print("websocket console: ok")


asyncio.run(main(sys.argv[1], sys.argv[2]))
