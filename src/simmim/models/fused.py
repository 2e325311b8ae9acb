"""Autograd functions for the training hot path that compute the same numbers as the plain ops, faster
or with less memory saved for the backward. Each falls back to the plain op where it does not apply.

- `Linear` / `linear`: float32 GEMMs on the CPU through the faster of two routes on this machine:
  oneDNN, or torch's BLAS (MKL's sgemm, which on AMD CPUs takes its AVX2 path and runs well below the
  rate oneDNN reaches with AVX-512, while on Intel AMX CPUs it beats oneDNN's fp32; docs/kernels.md
  has the figures). kernels.py holds both routes (`matmul_nt`) and the choice (`runtime.gemm_route`,
  decided once per run).
- `PointwiseConv`: a 1x1 convolution (SimMIM's decoder) computed by `linear`.
- `gelu_linear`: fc2(gelu(h)) keeping only h for the backward in fp32 (gelu(h), as large, is recomputed there).
- `norm_linear`: linear(layer_norm(x)), optionally with the tokens reordered between the two, keeping
  x and the norm's statistics for the backward but not the norm's output (recomputed there).
- `TokenGather`: a reordering of tokens (with zero padding) whose backward is the inverse reordering.
- `biased_attention`: attention with a learned additive bias. On the CPU SDPA gives such a bias a
  gradient only through its math path: separate passes for the scale and the bias, and scaled copies
  of q and k kept for the backward; here one baddbmm applies both and the backward keeps q, k, v and
  the probabilities.

Under torch.compile dynamo traces the autograd functions, forward and backward, into the graph (no
graph break around them: tests/test_compile.py); their oneDNN GEMMs become the custom op
simmim::onednn_linear (kernels.py), which Inductor calls as one kernel, and `biased_attention` hands
over to SDPA, which the compiler lowers itself.

The private torch APIs used each have a public fallback taken where they are missing: oneDNN's
linear and the dispatch-mode probe (kernels.py) and the softmax backward (-> its formula).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import matmul_nt, use_onednn, weight_grads


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return matmul_nt(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        grad_x = matmul_nt(flat, weight.t()).view(x.shape) if ctx.needs_input_grad[0] else None
        return grad_x, *weight_grads(x.reshape(-1, x.shape[-1]), flat, ctx.needs_input_grad[1:])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the float32 CPU GEMMs of forward and backward in oneDNN where `kernels.gemm_route` chose it."""
    if use_onednn(x, weight):
        return _Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class PointwiseConv(nn.Conv2d):
    """nn.Conv2d with a 1x1 kernel (same parameters and state dict) computed by `linear` over the
    channels: its GEMMs take the calibrated route instead of ATen's im2col convolution, and its weight
    gradient has the parameter's strides (oneDNN's bf16 convolution returns another layout of it, for
    which DDP warns and copies)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.view(self.out_channels, self.in_channels)
        return linear(x.permute(0, 2, 3, 1), weight, self.bias).permute(0, 3, 1, 2)


def take_tokens(x: torch.Tensor, index: torch.Tensor, pad: bool) -> torch.Tensor:
    """x[:, index] for x (B, L, C), where with `pad` the index L picks a zero token."""
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], 1)
    # rows of the flattened (B L, C) map: ATen's CPU index_select runs on one thread along dim 1 and
    # on all of them along dim 0
    b, length, c = x.shape
    rows = (torch.arange(0, b * length, length, device=x.device)[:, None] + index).view(-1)
    return x.reshape(b * length, c).index_select(0, rows).view(b, -1, c)


class _TakeTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, pad: bool, inverse: torch.Tensor,
                inverse_pad: bool) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.inverse_pad = inverse_pad
        return take_tokens(x, index, pad)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return take_tokens(grad, ctx.saved_tensors[0], ctx.inverse_pad), None, None, None, None


class TokenGather(NamedTuple):
    """A reordering of the tokens of (B, L, C) maps: `index` picks each output token (L, when `pad`, a
    zero token) and `inverse` undoes it. It is a permutation up to the padding, so the gradient is the
    inverse gather rather than a scatter-add (a padding token's gradient is dropped)."""

    index: torch.Tensor
    pad: bool
    inverse: torch.Tensor
    inverse_pad: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _TakeTokens.apply(x, self.index, self.pad, self.inverse, self.inverse_pad)

    def inverted(self) -> TokenGather:
        return TokenGather(self.inverse, self.inverse_pad, self.index, self.pad)


class _NormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None,
                eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
                gather: TokenGather | None) -> torch.Tensor:
        dtype = _gemm_dtype(x)
        y, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
        w = weight.to(dtype)
        y = _gathered(y.to(dtype), gather)
        ctx.save_for_backward(x, norm_weight, norm_bias, mean, rstd, w, None if kernels.recompute("norm", dtype) else y)
        ctx.eps, ctx.gather, ctx.dtypes = eps, gather, (weight.dtype, None if bias is None else bias.dtype)
        return matmul_nt(y, w, _cast(bias, dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, norm_weight, norm_bias, mean, rstd, weight, y = ctx.saved_tensors
        if y is None:  # recomputed bit for bit
            y = torch.native_layer_norm(x, x.shape[-1:], norm_weight, norm_bias, ctx.eps)[0]
            y = _gathered(y.to(grad.dtype), ctx.gather)
        flat = grad.reshape(-1, grad.shape[-1])
        y = y.reshape(flat.shape[0], -1)
        grad_weight, grad_bias = weight_grads(y, flat, ctx.needs_input_grad[4:6])
        grad_y = matmul_nt(grad, weight.t())
        if ctx.gather is not None:
            grad_y = take_tokens(grad_y, ctx.gather.inverse, ctx.gather.inverse_pad)
        grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
            grad_y.to(x.dtype), x, x.shape[-1:], mean, rstd, norm_weight, norm_bias, list(ctx.needs_input_grad[:3]))
        return (grad_x, grad_norm_weight, grad_norm_bias, None, _cast(grad_weight, ctx.dtypes[0]),
                _cast(grad_bias, ctx.dtypes[1]), None)


def _gathered(y: torch.Tensor, gather: TokenGather | None) -> torch.Tensor:
    # reordered after the cast to the GEMM's dtype, so that under autocast it moves half the bytes
    return y if gather is None else take_tokens(y, gather.index, gather.pad)


def norm_linear(x: torch.Tensor, norm: nn.LayerNorm, layer: nn.Linear, gather: TokenGather | None = None
                ) -> torch.Tensor:
    """layer(gather(norm(x))), the norm's output recomputed in the backward instead of kept: one cheap
    elementwise pass for an activation the size of x (kept with runtime.recompute=keep)."""
    return _NormLinear.apply(x, norm.weight, norm.bias, norm.eps, layer.weight, layer.bias, gather)


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    # contiguous like the parameters: AccumulateGrad copies a gradient whose layout differs from its
    # parameter's (a transposed weight gradient), and here the cast makes that copy anyway
    return t if t is None else t.to(dtype, memory_format=torch.contiguous_format)


def _gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer on x computes in: autocast's where it is on, else x's. The functions
    cast explicitly and keep the cast weight for the backward, as autograd through autocast does."""
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        dtype = _gemm_dtype(h)
        w = weight.to(dtype)
        act = F.gelu(h).to(dtype)
        ctx.save_for_backward(h, w, None if kernels.recompute("gelu", dtype) else act)
        ctx.dtypes = weight.dtype, bias.dtype
        return matmul_nt(act, w, bias.to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight, act = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        grad_h = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.ops.aten.gelu_backward(matmul_nt(grad, weight.t()).to(h.dtype), h)
        if ctx.needs_input_grad[1]:
            act = (F.gelu(h).to(grad.dtype) if act is None else act).reshape(flat.shape[0], -1)
        grad_weight, grad_bias = weight_grads(act, flat, ctx.needs_input_grad[1:])
        return grad_h, _cast(grad_weight, ctx.dtypes[0]), _cast(grad_bias, ctx.dtypes[1])


def gelu_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """F.linear(F.gelu(h), weight, bias) that saves h alone for the backward: the MLP's largest
    activation (4x the width) is held once instead of twice, for one more elementwise pass (both held
    under bf16 or with runtime.recompute=keep: `kernels.recompute`)."""
    return _GeluLinear.apply(h, weight, bias)


def softmax_backward(grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The gradient of softmax's input over the last dimension from its output `probs`: the public
    formula of torch's private `_softmax_backward_data`."""
    return probs * (grad - (grad * probs).sum(-1, keepdim=True))


def _softmax_backward(grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    # torch's kernel makes one pass without the product's temporary
    if hasattr(torch, "_softmax_backward_data"):
        return torch._softmax_backward_data(grad, probs, -1, probs.dtype)
    return softmax_backward(grad, probs)


class _BiasedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, bias: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
        g, n, width = qkv.shape
        qkv = qkv.view(g, n, 3, heads, -1).permute(2, 0, 3, 1, 4).reshape(3, g * heads, n, -1)
        q, k, v = qkv.unbind(0)
        scores = qkv.new_empty(g // bias.shape[0], *bias.shape).copy_(bias).view(g * heads, n, n)
        # scale and bias inside the GEMM; out= keeps it an aten.baddbmm that the MAC counter sees
        torch.baddbmm(scores, q, k.transpose(1, 2), alpha=scale, out=scores)
        probs = torch.softmax(scores, -1)
        ctx.save_for_backward(qkv, probs)
        ctx.bias_shape, ctx.bias_dtype, ctx.scale = bias.shape, bias.dtype, scale
        return torch.bmm(probs, v).view(g, heads, n, -1).transpose(1, 2).reshape(g, n, width // 3)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        qkv, probs = ctx.saved_tensors
        q, k, v = qkv.unbind(0)
        gh, n, d = q.shape
        heads = gh // grad.shape[0]
        grad = grad.reshape(-1, n, heads, d).transpose(1, 2).reshape(gh, n, d)
        scores = _softmax_backward(torch.bmm(grad, v.transpose(1, 2)), probs)
        grad_qkv = torch.empty_like(qkv)
        torch.bmm(probs.transpose(1, 2), grad, out=grad_qkv[2])
        torch.baddbmm(grad_qkv[0], scores, k, beta=0, alpha=ctx.scale, out=grad_qkv[0])
        torch.baddbmm(grad_qkv[1], scores.transpose(1, 2), q, beta=0, alpha=ctx.scale, out=grad_qkv[1])
        grad_qkv = grad_qkv.view(3, -1, heads, n, d).permute(1, 3, 0, 2, 4).reshape(-1, n, 3 * heads * d)
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = scores.view(-1, *ctx.bias_shape).sum(0).to(ctx.bias_dtype)
        return grad_qkv, grad_bias, None, None


def biased_attention(qkv: torch.Tensor, bias: torch.Tensor, heads: int, scale: float,
                     dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v per head: qkv (G, N, 3C) fused projections [q; k; v], bias
    (g, nH, N, N), group i using bias[i % g] (G a multiple of g) -> (G, N, C)."""
    if qkv.device.type == "cpu" and dropout == 0.0 and not torch.compiler.is_compiling():
        return _BiasedAttention.apply(qkv, bias, heads, scale)
    # elsewhere SDPA's fused kernels give the bias its gradient (CUDA's memory-efficient attention),
    # and under torch.compile the compiler fuses SDPA's math
    g, n, width = qkv.shape
    q, k, v = qkv.view(g, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(bias, g, q.dtype), dropout_p=dropout,
                                         scale=scale)
    return out.transpose(1, 2).reshape(g, n, width // 3)


def window_mask(bias: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """SDPA's additive mask (G, nH, N, N) from a per-window bias (g, nH, N, N), group i using bias[i % g].
    Four dimensions, as SDPA's fused GPU kernels require (they refuse a 5-D batch-broadcast form)."""
    return bias.to(dtype).expand(groups // bias.shape[0], *bias.shape).reshape(groups, *bias.shape[1:])
