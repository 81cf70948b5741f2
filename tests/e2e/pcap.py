"""Just enough pcap reading for the wire tests: TCP payloads per direction of a capture
(from ``tcpdump -w``, Ethernet link type), a check that a byte stream is a sequence
of well-formed TLS records, and ``Tcpdump`` to capture one interface of a netns."""

from __future__ import annotations

import signal
import struct
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

Flow = tuple[str, int, str, int]


@dataclass
class Capture:
    streams: dict[Flow, bytes]
    """Reassembled TCP payload per direction, in sequence order, duplicates dropped, up to
    the first hole (a packet the capture missed)."""
    sizes: dict[Flow, int]
    """All payload bytes seen per direction (holes or not)."""
    packets: int
    declared: int = 0
    """TCP payload bytes of all packets as their IP and TCP headers declare them: counts
    what a short snaplen cut off (duplicates and retransmissions included)."""


def _ip(b: bytes) -> str:
    return ".".join(str(x) for x in b)


def read_pcap(path: Path) -> Capture:
    data = path.read_bytes()
    magic = struct.unpack_from("<I", data, 0)[0]
    if magic == 0xA1B2C3D4:
        endian = "<"
    elif magic == 0xD4C3B2A1:
        endian = ">"
    else:
        raise ValueError(f"{path}: not a pcap file (magic {magic:#x})")
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    off = 24
    segments: dict[Flow, dict[int, bytes]] = defaultdict(dict)
    last_seq: dict[Flow, tuple[int, int]] = {}  # (as sent, unwrapped)
    packets = declared = 0
    while off + 16 <= len(data):
        _, _, caplen, _ = struct.unpack_from(endian + "IIII", data, off)
        off += 16
        pkt = data[off : off + caplen]
        off += caplen
        packets += 1
        if linktype == 1:  # Ethernet
            if len(pkt) < 14 or struct.unpack_from("!H", pkt, 12)[0] != 0x0800:
                continue
            ip = pkt[14:]
        elif linktype == 113:  # Linux cooked
            if struct.unpack_from("!H", pkt, 14)[0] != 0x0800:
                continue
            ip = pkt[16:]
        else:
            raise ValueError(f"unsupported link type {linktype}")
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6:
            continue
        total = struct.unpack_from("!H", ip, 2)[0]
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack_from("!HHI", tcp, 0)
        doff = (tcp[12] >> 4) * 4
        declared += total - ihl - doff
        payload = tcp[doff:]
        if payload:
            flow = (_ip(ip[12:16]), sport, _ip(ip[16:20]), dport)
            # sequence numbers wrap at 2**32: from a random start, often within a few 100 MB
            raw, prev = seq, last_seq.get(flow)
            if prev is not None:
                step = (raw - prev[0]) & 0xFFFFFFFF
                seq = prev[1] + (step - (1 << 32) if step >= 1 << 31 else step)
            last_seq[flow] = (raw, seq)
            segments[flow].setdefault(seq, payload)
    streams: dict[Flow, bytes] = {}
    sizes: dict[Flow, int] = {}
    for flow, segs in segments.items():
        out = bytearray()
        expected: int | None = None
        for seq in sorted(segs):
            payload = segs[seq]
            if expected is not None and seq > expected:
                break  # a hole: the capture missed a packet
            if expected is not None and seq < expected:
                payload = payload[expected - seq :]
            out += payload
            expected = max(expected or 0, seq + len(segs[seq]))
        streams[flow] = bytes(out)
        sizes[flow] = sum(len(p) for p in segs.values())
    return Capture(streams=streams, sizes=sizes, packets=packets, declared=declared)


def tls_records(stream: bytes) -> list[tuple[int, int]]:
    """``(content type, length)`` of each TLS record; raises ValueError if the stream is
    not a sequence of TLS records (a trailing partial record is allowed: capture cut)."""
    records = []
    i = 0
    while i + 5 <= len(stream):
        ctype, major, minor, length = struct.unpack_from("!BBBH", stream, i)
        if ctype not in (20, 21, 22, 23) or major != 3 or minor not in (1, 3):
            raise ValueError(f"not a TLS record at offset {i}: {stream[i : i + 5].hex()}")
        if length > 16384 + 256:
            raise ValueError(f"TLS record too long at offset {i}: {length}")
        records.append((ctype, length))
        i += 5 + length
    return records


def server_hello_version(stream: bytes) -> int | None:
    """The TLS version a ServerHello selected (``0x0304`` for TLS 1.3), from the server's
    side of a capture; None if there is no ServerHello at the start."""
    if len(stream) < 5 or stream[0] != 22:
        return None
    length = struct.unpack_from("!H", stream, 3)[0]
    hs = stream[5 : 5 + length]
    if not hs or hs[0] != 2:  # ServerHello
        return None
    # type(1) len(3) version(2) random(32) session_id(1+n) cipher(2) compression(1)
    i = 4 + 2 + 32
    i += 1 + hs[i]
    i += 2 + 1
    ext_len = struct.unpack_from("!H", hs, i)[0]
    i += 2
    end = i + ext_len
    legacy = struct.unpack_from("!H", hs, 4)[0]
    while i + 4 <= end:
        etype, elen = struct.unpack_from("!HH", hs, i)
        if etype == 0x002B and elen == 2:
            return int(struct.unpack_from("!H", hs, i + 4)[0])
        i += 4 + elen
    return int(legacy)


class Tcpdump:
    """``tcpdump -i IFACE`` (TCP only) inside the netns at ``netns_path``, writing to
    ``path`` (the caller's file); ``stop()`` ends it and reads the capture."""

    def __init__(self, netns_path: str, iface: str, path: Path, snaplen: int = 0) -> None:
        self.path = path
        self.p = subprocess.Popen(
            # --immediate-mode: without it packets wait in a kernel block for up to 1 s,
            # and whatever is still waiting when tcpdump is stopped is lost
            ["nsenter", f"--net={netns_path}", "tcpdump", "-i", iface, "--immediate-mode",
             "-U", "-B", "32768",
             "-s", str(snaplen), "-w", str(path), "tcp"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        # capturing once it says "listening on" (can take over a second on a busy box)
        assert self.p.stderr is not None
        deadline = time.monotonic() + 15
        seen = ""
        while "listening on" not in seen:
            line = self.p.stderr.readline()
            if not line or time.monotonic() > deadline:
                self.p.kill()
                raise RuntimeError(f"tcpdump -i {iface} in {netns_path} did not start: {seen}")
            seen += line
        time.sleep(0.2)

    def stop(self) -> Capture:
        time.sleep(0.5)  # the last packets reach the file
        self.p.send_signal(signal.SIGINT)
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        return read_pcap(self.path)

    def payload_bytes(self) -> int:
        """Stop; how many TCP payload bytes crossed the interface (all flows, as the
        headers declare them, so a short snaplen is enough)."""
        return self.stop().declared
