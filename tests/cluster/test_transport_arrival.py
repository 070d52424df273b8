"""A reply's round trip ends when it arrives, not when the attention worker reads it
(`recv_frame_stamped`: the kernel's receive timestamp): a reply read late, behind another
node's reply and its observers, keeps its own time, so a slow link is blamed on its node."""

from __future__ import annotations

import socket
import time

import numpy as np
import torch

from expertmesh.cluster.dispatch import Dispatcher
from expertmesh.cluster.transport_channel import recv_frame_stamped, send_frame, stamp_arrivals
from expertmesh.cluster.wire import LENGTH
from expertmesh.models.checkpoint import read_config

from .test_dispatch import NODES, spread_routes
from .test_transport import channel_model


def test_a_frame_read_late_keeps_the_time_it_arrived():
    with socket.create_server(("127.0.0.1", 0)) as server:
        reader = socket.create_connection(server.getsockname())
        writer, _ = server.accept()
        with reader, writer:
            assert stamp_arrivals(reader)
            payload = b"x" * 100_000
            # The kernel turns receive timestamps on a moment after the first socket asks (a
            # deferred switch): frames before then have none, and are timed when read.
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                send_frame(writer, [LENGTH.pack(3), b"abc"])
                if recv_frame_stamped(reader)[1] is not None:
                    break
                time.sleep(0.01)
            for late_s in (0.0, 0.05, 0.2):
                sent = time.perf_counter()
                send_frame(writer, [LENGTH.pack(len(payload)), payload])
                time.sleep(late_s)
                frame, arrived = recv_frame_stamped(reader)
                read = time.perf_counter()
                assert bytes(frame) == payload
                assert arrived is not None and sent <= arrived <= read
                assert arrived - sent < 0.03, f"read {late_s} s late, arrival {arrived - sent} s"
                assert read - sent >= late_s


def test_a_socket_without_stamps_says_so():
    with socket.create_server(("127.0.0.1", 0)) as server:
        reader = socket.create_connection(server.getsockname())
        writer, _ = server.accept()
        with reader, writer:
            send_frame(writer, [LENGTH.pack(3), b"abc"])
            frame, arrived = recv_frame_stamped(reader)
            assert bytes(frame) == b"abc" and arrived is None


class SlowObserver:
    """Takes `pause_s` per reply (what unpacking and detectors cost on a loaded machine)."""

    def __init__(self, pause_s: float) -> None:
        self.pause_s = pause_s
        self.round_trips: list[tuple[str, float]] = []

    def on_reply(self, node, layer, rows, nbytes, round_trip_s, busy_s) -> None:
        self.round_trips.append((node, round_trip_s))
        time.sleep(self.pause_s)

    def on_step(self, layer, counts) -> None:
        pass


def test_dispatch_times_each_reply_at_arrival_not_after_the_replies_read_before_it(
    hf_checkpoint,
):
    path, _ = hf_checkpoint("mixtral")
    config = read_config(path)
    ep = channel_model(path, spread_routes(config))
    d: Dispatcher = ep.dispatcher
    pause = 0.3
    observer = SlowObserver(pause)
    layer = config.moe_layer_ids[0]
    rng = np.random.default_rng(0)
    n = 64
    x = torch.from_numpy(rng.standard_normal((n, config.hidden_size)).astype(np.float32))
    experts = np.sort(rng.integers(0, config.moe.num_experts, n))
    counts = np.bincount(experts, minlength=config.moe.num_experts).tolist()
    d.finish(d.start(layer, x, np.arange(n), experts, counts))  # channels open, stamps on
    time.sleep(0.1)
    d.observers.append(observer)
    for _ in range(3):
        observer.round_trips.clear()
        d.finish(d.start(layer, x, np.arange(n), experts, counts))
        nodes = [node for node, _ in observer.round_trips]
        assert sorted(nodes) == sorted(NODES)
        # The last reply was read two pauses (0.6 s) after it arrived; its round trip is its own.
        slowest = max(rt for _, rt in observer.round_trips)
        assert slowest < pause / 2, observer.round_trips
