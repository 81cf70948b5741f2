"""Sans-I/O protocol machines: bytes in, events out. Nothing here imports asyncio or
socket, opens a file, reads a clock or sleeps; the proxy layer drives these machines."""
