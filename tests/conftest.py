"""Shared fixtures: tiny Hugging Face checkpoints built with `transformers` (no hub access)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu`-marked tests (tests/gpu/) skip, saying why, unless torch sees a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def _hf_model(family: str):
    """A tiny transformers model of `family` (config sizes chosen to exercise every feature)."""
    import transformers as tf

    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    if family == "mixtral":
        cfg = tf.MixtralConfig(**common, num_local_experts=6, num_experts_per_tok=2)
        return tf.MixtralForCausalLM(cfg)
    if family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(
            **common,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
            mlp_only_layers=[1],
        )
        return tf.Qwen2MoeForCausalLM(cfg)
    if family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            **common,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            head_dim=24,
            norm_topk_prob=True,
        )
        return tf.Qwen3MoeForCausalLM(cfg)
    if family == "olmoe":
        cfg = tf.OlmoeConfig(
            **common, num_experts=6, num_experts_per_tok=2, eos_token_id=255, pad_token_id=0
        )
        return tf.OlmoeForCausalLM(cfg)
    mla = dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
    )
    # transformers' MLA needs num_key_value_heads == num_attention_heads
    mla_common = {**common, "num_key_value_heads": common["num_attention_heads"]}
    if family == "deepseek_v2":
        cfg = tf.DeepseekV2Config(
            **mla_common,
            **mla,
            q_lora_rank=None,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
        )
        return tf.DeepseekV2ForCausalLM(cfg)
    if family == "deepseek_v3":
        cfg = tf.DeepseekV3Config(
            **mla_common, **mla, q_lora_rank=24, n_group=2, topk_group=1, routed_scaling_factor=1.5
        )
        return tf.DeepseekV3ForCausalLM(cfg)
    raise ValueError(family)


def make_hf_checkpoint(
    family: str, path: Path, seed: int = 0, std: float = 0.15, max_shard_size: str | None = None
):
    """Build, re-initialise with a larger std (so implementations cannot agree by accident),
    save with `save_pretrained`, and return the transformers model."""
    torch.manual_seed(seed)
    model = _hf_model(family).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else noise * std)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> Callable[[str], tuple[Path, object]]:
    """hf_checkpoint(family) -> (checkpoint dir, transformers model); built once per session."""
    built: dict[str, tuple[Path, object]] = {}

    def get(family: str) -> tuple[Path, object]:
        if family not in built:
            path = tmp_path_factory.mktemp(f"ckpt-{family}")
            # Shard Mixtral's checkpoint so the index-json path is exercised too.
            shard = "200KB" if family == "mixtral" else None
            built[family] = (path, make_hf_checkpoint(family, path, max_shard_size=shard))
        return built[family]

    return get


@contextlib.contextmanager
def _ray_head(num_cpus: int, prefix: str) -> Iterator[tuple[str, dict[str, str]]]:
    """Our own Ray head (`ray start --head --block`) with token auth. Every port is chosen free:
    other Ray instances on the machine would otherwise collide with the fixed default ports of
    the dashboard agent. Stopped by ending its process group, never `ray stop` (which would stop
    every Ray on the machine). A head that exits while starting (a "free" port taken by another
    process meanwhile) is started again on new ports, up to three times. Yields (dashboard
    address, client environment with its token)."""
    for attempt in range(3):
        temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths
        head, address, env = _start_head(num_cpus, temp_dir)
        try:
            if _job_agent_up(head, address, env):
                yield address, env
                return
            if head.poll() is None or attempt == 2:  # still running but never ready: give up
                pytest.fail("the Ray head's job agent did not come up")
        finally:
            _stop_head(head)
            shutil.rmtree(temp_dir, ignore_errors=True)


def _start_head(num_cpus: int, temp_dir: str) -> tuple[subprocess.Popen, str, dict[str, str]]:
    dashboard_port = _free_port()
    ports = [
        "--port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port",
        "--object-manager-port", "--ray-client-server-port",
    ]  # fmt: skip
    ray = str(Path(sys.executable).with_name("ray"))
    argv = [ray, "start", "--head", "--block", "--num-cpus", str(num_cpus), "--temp-dir", temp_dir]
    argv += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1"]
    argv += ["--disable-usage-stats", f"--dashboard-port={dashboard_port}"]
    argv += [f"{p}={_free_port()}" for p in ports]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    head = subprocess.Popen(
        argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    return head, f"http://127.0.0.1:{dashboard_port}", env


def _job_agent_up(head: subprocess.Popen, address: str, env: dict[str, str]) -> bool:
    """Wait until a job can be submitted; False when the head exits first (or after 300 s)."""
    probe = (
        "import sys; from ray.job_submission import JobSubmissionClient as C; "
        "C(sys.argv[1]).submit_job(entrypoint='true')"
    )
    deadline = time.monotonic() + 300
    # The dashboard, then the job agent, come up seconds after the head.
    while subprocess.run([sys.executable, "-c", probe, address], env=env).returncode != 0:
        if head.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(2)
    return True


def _stop_head(head: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have exited on its own
        os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def local_ray_head() -> Callable[[int, str], contextlib.AbstractContextManager]:
    """A factory: `with local_ray_head(num_cpus, prefix) as (address, env): ...`."""
    return _ray_head
