"""Pure decisions over a ``MeshSnapshot``: where a connection goes, which endpoint.

No I/O, no asyncio, no sockets.
"""
