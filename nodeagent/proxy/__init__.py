"""The data path: the only code that owns proxied sockets (asyncio on uvloop)."""
