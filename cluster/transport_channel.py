"""A persistent TCP channel between the attention worker and one expert shard.

The shard's actor opens a listener on its node's IP (`ChannelServer`, started by a Ray call
that returns the address); the attention worker connects once and then sends framed
requests (`cluster/wire.py`) and reads framed replies on the same socket, layer after layer.
No Ray task, no object store, no pickling per layer: one `send` and one `recv` each way.

Why not Ray Compiled Graphs: they work on CPU here, but between Ray nodes their channels go
through the object manager and measured 0.9 ms for one node and 1.5 ms for three per
round trip on this machine, no better than a plain actor call; this channel measured 25 us
for one node and about 120 us for three (benchmarks/bench_dataplane.py measures all three in
one run). Ray still places, starts, restarts and kills the shard; only the bytes of each
layer call bypass it. On the rig those bytes cross the node's shaped link like any TCP.

A connection must first present the secret the attention worker gave the shard through Ray
(`open_channel(secret)`), so nothing else on the network can drive a shard.

Each connection has a reader thread that drains incoming requests and a worker thread that
computes and replies in order, so a caller that sends a second request before reading the
first reply (two micro-batches in flight) can never deadlock on full socket buffers; a small
request with nothing ahead of it is answered by the reader itself (`INLINE_FRAME_BYTES`).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence

from .wire import LENGTH

log = logging.getLogger("expertmesh.channel")

MAX_FRAME_BYTES = 1 << 31
"""A length prefix above this is treated as a corrupt stream (the connection is dropped)."""


class ChannelClosed(ConnectionError):
    """The other end closed the channel, or its process died."""


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ChannelClosed("channel closed by the other end")
        got += k
    return buf


def recv_frame(sock: socket.socket) -> bytearray:
    (size,) = LENGTH.unpack(recv_exact(sock, LENGTH.size))
    if size > MAX_FRAME_BYTES:
        raise ChannelClosed(f"frame of {size} bytes announced: stream is corrupt")
    return recv_exact(sock, size)


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
"""Linux's SO_TIMESTAMPNS (35 on every architecture but a few old ones; Python 3.11 does not
export it). Its control message (SCM_TIMESTAMPNS, the same number) carries a `timespec`: the
CLOCK_REALTIME time the kernel received the packet whose bytes that recvmsg returned last."""
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)


def stamp_arrivals(sock: socket.socket) -> bool:
    """Ask the kernel to timestamp the packets `sock` receives (`recv_frame_stamped`); False
    where the platform refuses (the caller then times frames when it reads them)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


def recv_frame_stamped(sock: socket.socket) -> tuple[bytearray, float | None]:
    """One frame and the moment its last bytes reached this host, on `time.perf_counter`'s
    clock (None when the kernel gave no timestamp: `stamp_arrivals` was not called or
    refused). The moment is the kernel's receive timestamp of the packet that completed the
    frame, so a frame read late (its reader busy with another node's reply, or with a
    micro-batch's attention) keeps the time it really arrived. The kernel switches receive
    timestamps on a moment after the first socket asks (a deferred switch), so the frames of
    that moment come without one. When the same packet also
    carried the start of the next frame (two replies back to back on one channel), TCP's
    receive queue merges them and the stamp is the later packet's: a few microseconds late."""
    size_bytes, stamp = _recv_stamped(sock, LENGTH.size, None)
    (size,) = LENGTH.unpack(size_bytes)
    if size > MAX_FRAME_BYTES:
        raise ChannelClosed(f"frame of {size} bytes announced: stream is corrupt")
    frame, stamp = _recv_stamped(sock, size, stamp)
    if stamp is None:
        return frame, None
    age_s = max(0.0, (time.time_ns() - stamp) * 1e-9)
    return frame, time.perf_counter() - age_s


def _recv_stamped(sock: socket.socket, n: int, stamp: int | None) -> tuple[bytearray, int | None]:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k, ancillary, _, _ = sock.recvmsg_into([view[got:]], _ANCILLARY)
        if not k:
            raise ChannelClosed("channel closed by the other end")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
                sec, nsec = _TIMESPEC.unpack_from(data)
                stamp = sec * 1_000_000_000 + nsec
        got += k
    return buf, stamp


def send_frame(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> None:
    """Send the buffers of one frame (length prefix included) with as few syscalls as can be."""
    if sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts) <= 64 * 1024:
        sock.sendall(b"".join(parts))
    else:
        for part in parts:
            sock.sendall(part)


INLINE_FRAME_BYTES = 64 << 10
"""A request up to this size, with nothing queued ahead of it, is answered by the reader
thread itself (saves a thread wake-up per layer call, which a loaded machine makes costly).
The reader sends that reply without blocking; whatever the peer's buffer cannot take at once
goes to the worker, so the reader never stops draining requests."""


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


Handler = Callable[[bytearray], Sequence[bytes | memoryview]]


class ChannelServer:
    """Listens on `host`; each authenticated connection's frames go through `handle`."""

    def __init__(self, host: str, secret: bytes, handle: Handler, name: str = "shard") -> None:
        self.secret = secret
        self.handle = handle
        self.name = name
        self._listener = socket.create_server((host, 0))
        self.address: tuple[str, int] = (host, self._listener.getsockname()[1])
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        threading.Thread(target=self._accept, name=f"{name}-channel", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        tune(conn)
        self._conns.add(conn)
        inbox: queue.Queue[tuple[bool, bytes | bytearray] | None] = queue.Queue()
        try:
            offered = recv_frame(conn)
            if not hmac.compare_digest(bytes(offered), self.secret):
                log.warning("%s: a connection offered the wrong channel secret", self.name)
                conn.close()
                return
            conn.sendall(LENGTH.pack(0))  # accepted
        except (OSError, ChannelClosed):
            conn.close()
            return
        queued = [0]  # frames handed to the worker and not yet answered
        lock = threading.Lock()
        threading.Thread(target=self._work, args=(conn, inbox, queued, lock), daemon=True).start()
        try:
            while True:
                frame = recv_frame(conn)
                with lock:
                    inline = len(frame) <= INLINE_FRAME_BYTES and queued[0] == 0
                    if not inline:
                        queued[0] += 1
                if not inline:
                    inbox.put((False, frame))
                    continue
                # Nothing ahead of it: answer here, no thread hand-off, never blocking.
                reply = b"".join(self.handle(frame))
                try:
                    sent = conn.send(reply, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                if sent < len(reply):
                    with lock:
                        queued[0] += 1
                    inbox.put((True, reply[sent:]))
        except (OSError, ChannelClosed):
            inbox.put(None)

    def _work(
        self,
        conn: socket.socket,
        inbox: queue.Queue[tuple[bool, bytes | bytearray] | None],
        queued: list[int],
        lock: threading.Lock,
    ) -> None:
        """Requests in order (or the rest of a reply the reader could not send at once)."""
        try:
            while (item := inbox.get()) is not None:
                is_reply, data = item
                if is_reply:
                    conn.sendall(data)
                else:
                    send_frame(
                        conn, self.handle(data if isinstance(data, bytearray) else bytearray(data))
                    )
                with lock:
                    queued[0] -= 1
        except OSError:
            pass
        finally:
            conn.close()
            self._conns.discard(conn)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Stop listening and drop every connection (their callers see the channel close)."""
        self._closed.set()
        self._listener.close()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


def connect(address: tuple[str, int], secret: bytes, timeout_s: float) -> socket.socket:
    """Open and authenticate a channel; ChannelClosed when the shard refuses or is gone."""
    try:
        sock = socket.create_connection(address, timeout=timeout_s)
        tune(sock)
        sock.sendall(LENGTH.pack(len(secret)) + secret)
        recv_exact(sock, LENGTH.size)
    except OSError as e:
        raise ChannelClosed(f"cannot open a channel to {address[0]}:{address[1]}: {e}") from e
    sock.settimeout(None)
    return sock
