"""Fused temporal attention (placeholder: reference only; the Triton kernel lands with issue 4).

out[n, i, h] = sum_j softmax_j(scale * <q[n,i,h], k[n,j,h]> + bias[h,i,j] | allowed(n,i,j)) v[n,j,h]
"""

from __future__ import annotations

import torch

from kernels import dispatch


def temporal_attention_reference(q, k, v, *, bias=None, causal=False, key_mask=None, scale=None):
    """PyTorch reference. q, k, v: (N, T, H, D); bias (H, T, T); key_mask bool (N, T). Rows with no
    allowed key return zeros."""
    n, t, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    scores = torch.einsum("nihd,njhd->nhij", q, k) * scale
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    allowed = torch.ones(t, t, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed.expand(n, 1, t, t)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    return torch.einsum("nhij,njhd->nihd", probs, v)


def temporal_attention(q, k, v, *, bias=None, causal=False, key_mask=None, scale=None):
    dispatch.resolve("temporal_attention", q, extra=("sdpa", "xformers"))
    return temporal_attention_reference(q, k, v, bias=bias, causal=causal, key_mask=key_mask, scale=scale)
