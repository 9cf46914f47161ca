"""The estimate runs scaled_dot_product_attention with the kernel of the device asked about: the
CPU's own choice agrees with the CPU probe, a GPU's fused kernel keeps no attention weights, and
the answer names the kernel it assumed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mbp_cli.memory.attention import DeviceAttention
from mbp_cli.memory.search import ProbeOptions
from mbp_cli.memory.weigh import probe_recipe
from mbp_cli.recipe.load import load_recipe
from tests import attention_blocks
from tests.conftest import small_recipe

CPU = torch.device("cpu")
MiB = 2**20


@pytest.fixture
def attention_recipe(write_recipe, tmp_path: Path):
    """A recipe for a model of attention_blocks.py (copied beside it) on its tokens."""
    shutil.copy(attention_blocks.__file__, tmp_path / "attention_blocks.py")

    def write(model: str = "AttentionClassifier", data_args: dict | None = None,
              train: dict | None = None, **model_args) -> Path:
        return write_recipe(small_recipe(
            model={"name": f"attention_blocks:{model}", "args": model_args},
            data={"name": "attention_blocks:Tokens", "args": data_args or {}},
            batch={"target": 64, "micro": "auto"}, optim={"name": "AdamW", "args": {}},
            train={"steps": 1, "eval_every": 0, "device": "cpu", **(train or {})}))

    return write


def probe_both(path: Path, budget_bytes: int = 8 * MiB):
    recipe = load_recipe(path)
    measured = probe_recipe(recipe, ProbeOptions(CPU, budget_bytes=budget_bytes))
    estimated = probe_recipe(recipe, ProbeOptions(CPU, budget_bytes=budget_bytes,
                                                  estimate=True))
    return measured, estimated


@pytest.mark.parametrize(("dropout", "kernel"), [(0.0, "flash"), (0.1, "math")])
def test_the_estimate_for_a_cpu_is_the_cpu_probe(attention_recipe, dropout, kernel):
    """torch's CPU flash kernel takes no dropout: with it the CPU runs math."""
    measured, estimated = probe_both(attention_recipe(dropout=dropout))
    assert [m.peak_bytes for m in estimated.measurements] == [
        m.peak_bytes for m in measured.measurements]
    assert estimated.fit.per_sample_bytes == measured.fit.per_sample_bytes
    assert estimated.attention == f"CPU {kernel} attention"


def test_a_hugging_face_bert_estimated_for_a_cpu_is_the_cpu_probe(attention_recipe):
    """Padded samples: Hugging Face makes the padding mask on real and on fake tensors alike
    (without padding it leaves it out on real ones only)."""
    pytest.importorskip("transformers")
    measured, estimated = probe_both(attention_recipe(
        "bert", data_args={"padding": 5, "as_dict": True}))
    assert [m.peak_bytes for m in estimated.measurements] == [
        m.peak_bytes for m in measured.measurements]
    assert estimated.attention == "CPU flash attention"


def test_a_gpu_estimate_keeps_no_attention_weights(attention_recipe):
    """With dropout a CPU runs math, which keeps the attention weights and the dropout mask:
    O(L²) per head; CUDA's fused kernel keeps its output and log-sum-exp whether or not it
    drops out, as the CPU's flash kernel does without dropout (L a multiple of 32: the fused
    kernel's log-sum-exp is not padded)."""
    budget = 8 * MiB
    options = ProbeOptions(None, budget_bytes=budget, estimate=True)  # None: a CUDA GPU
    gpu = probe_recipe(load_recipe(attention_recipe(dropout=0.1)), options)
    assert gpu.attention == "CUDA memory-efficient attention"  # fp32: no flash
    math_cpu, _ = probe_both(attention_recipe(dropout=0.1), budget)
    fused_cpu, _ = probe_both(attention_recipe(dropout=0.0), budget)
    assert gpu.fit.per_sample_bytes == fused_cpu.fit.per_sample_bytes
    assert gpu.fit.per_sample_bytes < math_cpu.fit.per_sample_bytes


@pytest.mark.parametrize(("model", "train", "kernel"), [
    ("AttentionClassifier", {}, "memory-efficient"),
    ("AttentionClassifier", {"precision": "bf16"}, "flash"),
    ("AttentionClassifier", {"dtype": "float64"}, "math"),  # no fused kernel takes float64
    ("EncoderClassifier", {}, "memory-efficient"),  # nn.MultiheadAttention's sdpa call, inside
])
def test_the_gpu_kernel_assumed(cli, attention_recipe, model, train, kernel):
    result = cli("probe", attention_recipe(model, train=train), "--estimate",
                 "--device-memory", "1GiB", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["attention"] == f"CUDA {kernel} attention"
    said = cli("probe", attention_recipe(model, train=train), "--estimate",
               "--device-memory", "1GiB")
    assert f"attention: CUDA {kernel} attention assumed" in said.stdout


def test_no_attention_named_where_there_is_none(write_recipe):
    recipe = load_recipe(write_recipe(small_recipe(batch={"target": 64, "micro": "auto"})))
    result = probe_recipe(recipe, ProbeOptions(None, budget_bytes=4 * MiB, estimate=True))
    assert result.attention is None


def test_the_kernel_is_put_in_place_only_while_active():
    q = torch.randn(2, 2, 8, 16)
    expected = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    attention = DeviceAttention("cpu")
    with attention.active():
        inside = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert attention.assumed == "CPU flash attention" and torch.allclose(inside, expected)
    attention.kernels.clear()
    F.scaled_dot_product_attention(q, q, q)
    assert attention.assumed is None
