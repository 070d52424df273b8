"""Transports: how a layer call's requests reach the shards (the `Transport` protocol lives in
`cluster/dispatch.py`, next to the dispatcher that uses it).

- `ChannelTransport`: one persistent TCP channel per shard (`cluster/transport_channel.py`),
  opened through a Ray call to the shard's actor and reopened whenever the pool's actor for
  a node changes (a standby promoted, a node rejoined) or the channel breaks. The default on
  a Ray pool. A dead actor shows as a closed channel: its node's reply is `ShardLost`, and
  the dispatcher's failover runs exactly as on the fallback path. Each reply carries the
  time it arrived (`ShardReply.arrived_at`, the kernel's receive timestamp of the packet that
  completed it, `transport_channel.recv_frame_stamped`), so the dispatcher's per-node round
  trip does not grow while another node's reply is read first. Measured on loopback: a frame
  read 20 ms late keeps an arrival 13-45 us after its send; the stamped read costs no more
  than the plain one within the noise (97-118 us per round trip either way).
- `PoolTransport` (in `cluster/dispatch.py`, the dispatcher's default without a pool
  transport, so the two modules import one way): one `ShardPool.submit_request` per node, read with `result` (on a Ray
  pool: one Ray actor task per node per layer, replies taken as they complete). The
  fallback, and the in-process pool's transport.
"""

from __future__ import annotations

import contextlib
import secrets
import select
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .dispatch import Sent, ShardLost
from .shard import ShardReply
from .transport_channel import (
    ChannelClosed,
    connect,
    recv_frame_stamped,
    send_frame,
    stamp_arrivals,
)
from .wire import EXPERT_NOT_LOADED, OK, ShardRequest, frame_request, read_reply

CHANNEL_SPIN_US = 0.0
"""How long the attention worker polls for replies before it sleeps, where the shards have
CPUs of their own (a real cluster, the rig; `ChannelTransport(spin_us=...)`). Off: measured on
the rig (mixed.yaml, EPLB's placement, 6 decode rows echoed to cpu-fast and cpu-slow, medians
of 300-400): a bare poll loop reading the frames gave 193 against 278-296 us on a quiet
machine; the transport polling for 300 us gave 385 against 297 us in a benchmark run, and
294-621 against 313-383 us in four alternating rounds, with other processes on the two
cores: a spinning attention worker takes a core the shards' nodes need on a machine this
small. On the embedded cluster the two nodes' p90 went 281 us -> 2.3 ms."""


def _open_on_actor(actor: Any, secret: bytes, timeout_s: float) -> tuple[str, int]:
    """Ask a shard's Ray actor to listen; ChannelClosed when it is dead or does not answer."""
    import ray

    try:
        host, port = ray.get(actor.open_channel.remote(secret), timeout=timeout_s)
    except (
        ray.exceptions.RayActorError,
        ray.exceptions.ActorUnavailableError,
        ray.exceptions.GetTimeoutError,
    ) as e:
        raise ChannelClosed(f"its actor did not open one ({type(e).__name__})") from e
    return str(host), int(port)


class ShardCallFailed(RuntimeError):
    """A shard raised while computing (a bug, not a lost shard): the step fails."""

    def __init__(self, node: str, error: str) -> None:
        super().__init__(f"expert shard on node '{node}' failed a layer call: {error}")
        self.node = node


class _Channel:
    def __init__(self, actor: Any, sock: Any) -> None:
        self.actor = actor
        self.sock = sock
        self.broken = False
        self.outstanding: deque[Sent] = deque()
        self.early: dict[int, tuple[bytearray, float | None]] = {}
        """Reply frames read ahead of their turn (id of their Sent -> frame, arrival): a retry
        sent on this channel after a later call's request has its reply behind that one's."""

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError):
            self.sock.close()


class ChannelTransport:
    """Persistent TCP channels to the shard actors of a `RayShardPool`-like pool (anything
    with `handles`: node -> Ray actor handle whose actor has `open_channel`)."""

    name = "channel"

    def __init__(
        self,
        pool: Any,
        connect_timeout_s: float = 10.0,
        reply_timeout_s: float = 60.0,
        open_channel: Callable[[Any, bytes, float], tuple[str, int]] | None = None,
        spin_us: float = 0.0,
    ) -> None:
        self.pool = pool
        self.spin_s = max(0.0, spin_us) * 1e-6
        """Poll the sockets (no sleep) for up to this long before blocking in `select`: a
        reply that comes back within it is read without the wake-up of a sleeping thread
        (30-70 us of a 137-155 us round trip on a quiet rig), at the cost of a core spent
        waiting. Where the shards share this process's cores it takes the CPU they answer
        with; see `CHANNEL_SPIN_US` for what was measured."""
        self.open_channel = open_channel or _open_on_actor
        """(actor, secret, timeout_s) -> (host, port): asks the shard to listen (a Ray call
        by default; tests pass in-process shards)."""
        self.connect_timeout_s = connect_timeout_s
        self.reply_timeout_s = reply_timeout_s
        """A shard that answers nothing for this long is treated as lost (a cut link, a hung
        process): its rows go elsewhere and the channel is reopened on the next call."""
        self.secret = secrets.token_bytes(32)
        self._channels: dict[str, _Channel] = {}
        self._opened: set[str] = set()
        self.reconnects = 0
        """Channels opened again after a first one (a shard replaced or a channel broken)."""

    def _channel(self, node: str) -> _Channel:
        actor = self.pool.handles.get(node)
        if actor is None:
            raise ShardLost(node, "the pool has no shard for it")
        ch = self._channels.get(node)
        if ch is not None and ch.actor is actor and not ch.broken:
            return ch
        if ch is not None:
            ch.close()
        if node in self._opened:
            self.reconnects += 1
        self._opened.add(node)
        try:
            address = self.open_channel(actor, self.secret, self.connect_timeout_s)
            sock = connect((str(address[0]), int(address[1])), self.secret, self.connect_timeout_s)
        except ChannelClosed as e:
            raise ShardLost(node, f"cannot open its channel: {e}") from e
        stamp_arrivals(sock)  # each reply keeps the time it arrived, not the time it is read
        ch = self._channels[node] = _Channel(actor, sock)
        return ch

    def send(
        self, requests: Mapping[str, ShardRequest], trace: dict[str, str] | None = None
    ) -> Sent:
        sent = Sent()
        for node, request in requests.items():
            sent.request_bytes[node] = request.nbytes
            try:
                ch = self._channel(node)
            except ShardLost as e:
                sent.lost[node] = e
                continue
            try:
                send_frame(ch.sock, frame_request(request, trace))
            except OSError as e:
                ch.close()
                sent.lost[node] = ShardLost(node, f"its channel broke: {e}")
                continue
            sent.sent_at[node] = time.perf_counter()
            ch.outstanding.append(sent)
            sent.handles[node] = ch
        return sent

    def replies(self, sent: Sent) -> Iterator[tuple[str, ShardReply | ShardLost]]:
        yield from sent.lost.items()
        waiting: dict[Any, str] = {}
        failure: ShardCallFailed | None = None
        out: list[tuple[str, ShardReply | ShardLost]]
        for node, ch in sent.handles.items():
            early = ch.early.pop(id(sent), None)
            if early is not None:
                failure = self._reply(node, early, failure, out := [])
                yield from out
            elif ch.broken:
                yield node, self._drop(node, ch, "its channel broke")
            else:
                waiting[ch.sock] = node
        deadline = time.monotonic() + self.reply_timeout_s
        while waiting:
            left = deadline - time.monotonic()
            ready = self._ready(list(waiting), left) if left > 0 else []
            if not ready:
                for node in list(waiting.values()):
                    why = f"no reply within {self.reply_timeout_s:g} s"
                    yield node, self._drop(node, sent.handles[node], why)
                return
            for sock in ready:
                node = waiting.pop(sock)
                ch = sent.handles[node]
                try:
                    frame = recv_frame_stamped(sock)
                except OSError as e:  # ChannelClosed included: the actor or its node died
                    yield node, self._drop(node, ch, f"its channel closed ({e})")
                    continue
                head = ch.outstanding.popleft()
                if head is not sent:  # another call's reply, due before ours: keep it
                    ch.early[id(head)] = frame
                    waiting[sock] = node
                    continue
                failure = self._reply(node, frame, failure, out := [])
                yield from out
        if failure is not None:  # every other reply was read: the channels stay in step
            raise failure

    def _ready(self, socks: list[Any], left: float) -> list[Any]:
        """The sockets with bytes to read: polled for `spin_s`, then waited for (`left`)."""
        if self.spin_s > 0:
            until = time.perf_counter() + min(self.spin_s, left)
            while True:
                ready = select.select(socks, [], [], 0)[0]
                if ready:
                    return ready
                if time.perf_counter() >= until:
                    break
        return select.select(socks, [], [], left)[0]

    @staticmethod
    def _reply(
        node: str,
        frame: tuple[bytearray, float | None],
        failure: ShardCallFailed | None,
        out: list[tuple[str, ShardReply | ShardLost]],
    ) -> ShardCallFailed | None:
        """`frame`: the reply's bytes and when they arrived (`recv_frame_stamped`)."""
        status, outputs, timings, error = read_reply(frame[0])
        if status == OK:
            reply = ShardReply(outputs, *timings, arrived_at=frame[1])  # type: ignore[arg-type]
            out.append((node, reply))
        elif status == EXPERT_NOT_LOADED:
            out.append((node, ShardLost(node, f"it lacks experts it is routed: layer {error}")))
        else:
            failure = failure or ShardCallFailed(node, str((error or {}).get("error")))
        return failure

    def _drop(self, node: str, ch: _Channel, why: str) -> ShardLost:
        ch.close()
        if self._channels.get(node) is ch:
            del self._channels[node]
        return ShardLost(node, why)

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()
