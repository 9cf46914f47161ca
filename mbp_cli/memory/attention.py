"""Attention in an estimate: scaled_dot_product_attention run with the kernel the device asked
about would choose, so that what the kernel keeps for backward is what the tracker counts."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend
from torch.utils._python_dispatch import _disable_current_modes

aten = torch.ops.aten
HALF = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256
KERNEL_NAMES = {"flash": "flash", "efficient": "memory-efficient", "math": "math"}


class DeviceAttention:
    """Runs every scaled_dot_product_attention call of a fake step as `device_type` would, and
    keeps the names of the kernels it ran.

    The kernels differ most in what they keep for backward: math keeps the attention weights
    (and the dropout mask), O(L²) per head; the fused kernels keep their output and a log-sum-exp,
    O(L). Left alone, torch would choose for the fake tensors, which are CPU tensors, as for a
    CPU (its CPU flash kernel, which takes no dropout, else math) whatever the device asked
    about. For `cpu` that choice is kept, asked of torch. For `cuda` it is an sm80+ GPU's (A100,
    H100) in torch's default order: flash for fp16/bf16 without a mask, else memory-efficient
    for fp32/fp16/bf16 with aligned head dims, else math. (Where torch puts cuDNN attention
    first, on some sm90 set-ups, it keeps what flash keeps.)

    The kernel takes the place of torch's own (`aten::scaled_dot_product_attention`, after
    autocast as torch's is) for the whole process, but only inside `active()`: while a fake
    step runs.
    """

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.kernels: dict[str, None] = {}  # in the order first run

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The device's kernel in place of torch's own for every call in this block."""
        with torch.library._scoped_library("aten", "IMPL") as library:
            library.impl("scaled_dot_product_attention", self._attention,
                         "CompositeImplicitAutograd")
            yield

    @property
    def assumed(self) -> str | None:
        """The kernels run, in words (`CUDA flash attention`); None where none was."""
        if not self.kernels:
            return None
        names = " and ".join(KERNEL_NAMES[kernel] for kernel in self.kernels)
        return f"{self.device_type.upper()} {names} attention"

    def _attention(self, query: Tensor, key: Tensor, value: Tensor,
                   attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                   is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False) -> Tensor:
        run = cuda_attention if self.device_type == "cuda" else cpu_attention
        kernel, output = run(query, key, value, attn_mask, dropout_p, is_causal, scale,
                             enable_gqa)
        self.kernels.setdefault(kernel)
        return output


def cuda_kernel(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
                is_causal: bool, enable_gqa: bool) -> str:
    """The kernel an sm80+ GPU runs for these inputs (torch's sdp_utils.cpp, default order;
    a kernel turned off, by `torch.nn.attention.sdpa_kernel` for one, is passed over)."""
    dims = (query.size(-1), key.size(-1), value.size(-1))
    is_dense = all(t.dim() == 4 and not t.is_nested and t.size(-2) > 0
                   for t in (query, key, value))
    heads_fit = is_dense and key.size(1) == value.size(1) and (
        query.size(1) == key.size(1) or (enable_gqa and query.size(1) % key.size(1) == 0))
    if not heads_fit or any(t.stride(-1) != 1 and t.size(-1) != 1 for t in (query, key, value)):
        return "math"
    if (torch.backends.cuda.flash_sdp_enabled() and query.dtype in HALF and attn_mask is None
            and len(set(dims)) == 1 and dims[0] <= FLASH_MAX_HEAD_DIM
            and not (is_causal and query.size(-2) != key.size(-2))):
        return "flash"
    alignment = 8 if query.dtype in HALF else 4  # the GEMMs' on tensor cores
    if (torch.backends.cuda.mem_efficient_sdp_enabled()
            and query.dtype in (*HALF, torch.float32) and dims[0] == dims[1]
            and dims[0] % alignment == 0 and dims[2] % alignment == 0
            and all(t.stride(-1) == 1 for t in (query, key, value))):
        return "efficient"
    return "math"


def cuda_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
                   dropout_p: float, is_causal: bool, scale: float | None,
                   enable_gqa: bool) -> tuple[str, Tensor]:
    """The kernel CUDA would choose and its output, as torch's CUDA path calls it (its
    padding and mask conversion included: they make tensors that backward keeps)."""
    kernel = cuda_kernel(query, key, value, attn_mask, is_causal, enable_gqa)
    if kernel == "flash":
        head_dim = query.size(-1)
        scale = 1 / math.sqrt(head_dim) if scale is None else scale  # of the unpadded size
        padding = -head_dim % 8
        if padding:
            query, key, value = (F.pad(t, (0, padding)) for t in (query, key, value))
        output = aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        return kernel, output[..., :head_dim] if padding else output
    attn_mask = additive_mask(attn_mask, query.dtype)
    if kernel == "efficient":
        if attn_mask is not None:
            attn_mask = aligned_bias(attn_mask, query, key)
        needs_logsumexp = torch.is_grad_enabled() and any(
            t.requires_grad for t in (query, key, value))
        return kernel, aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, needs_logsumexp, dropout_p, is_causal,
            scale=scale)[0]
    return kernel, math_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                  enable_gqa)


def cpu_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
                  dropout_p: float, is_causal: bool, scale: float | None,
                  enable_gqa: bool) -> tuple[str, Tensor]:
    """torch's own CPU choice (asked with small real tensors of the same sizes, dtypes and last
    strides: the choice reads nothing else) and its output, as torch's CPU path calls it."""
    def stand_in(tensor: Tensor | None) -> Tensor | None:
        if tensor is None:
            return None
        row = torch.empty(tensor.size(-1) * max(tensor.stride(-1), 1), dtype=tensor.dtype)
        return row.as_strided(tensor.shape, (0,) * (tensor.dim() - 1) + (tensor.stride(-1),))

    with _disable_current_modes():  # real tensors, untracked
        choice = torch._fused_sdp_choice(
            stand_in(query), stand_in(key), stand_in(value), stand_in(attn_mask), dropout_p,
            is_causal, scale=scale, enable_gqa=enable_gqa)
    attn_mask = additive_mask(attn_mask, query.dtype)
    if choice == int(SDPBackend.FLASH_ATTENTION):
        return "flash", aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
    return "math", math_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                  enable_gqa)


def math_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
                   dropout_p: float, is_causal: bool, scale: float | None,
                   enable_gqa: bool) -> Tensor:
    """The math kernel: matmuls and a softmax, any device."""
    return aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale,
        enable_gqa=enable_gqa)[0]


def additive_mask(attn_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask as the additive one torch makes of it (0 where attended, -inf not)."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.where(attn_mask, 0.0,
                       torch.scalar_tensor(-math.inf, dtype=dtype, device=attn_mask.device))


def aligned_bias(attn_mask: Tensor, query: Tensor, key: Tensor) -> Tensor:
    """The mask as memory-efficient attention takes it: rows aligned to 8 elements (a padded
    copy where they are not), expanded to (batch, heads, L, S)."""
    is_aligned = attn_mask.stride(-1) == 1 and all(s % 8 == 0 for s in attn_mask.stride()[:-1])
    if not is_aligned:
        length = attn_mask.size(-1)
        attn_mask = F.pad(attn_mask, (0, 8 - length % 8))[..., :length]
    return attn_mask.expand(query.size(0), query.size(1), query.size(2), key.size(2))
