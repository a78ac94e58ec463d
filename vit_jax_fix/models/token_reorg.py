"""EViT token reorganisation (Liang et al., ICLR 2022), with static shapes.

Between the attention and the MLP of a reorganising block, the class token's attention row, averaged over
heads, scores the other tokens; the k = ceil(keep_rate * (N - 1)) highest are kept in descending score order,
and (with fusion) the rest are merged into one token, weighted by their (not renormalised) scores and appended
last. k depends only on the static token count and keep rate, so every shape is known at trace time and XLA
compiles a program that really runs fewer tokens.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def kept_tokens(num_tokens: int, keep_rate: float) -> int:
  """k = ceil(keep_rate * (N - 1)) in float64, as the official code (N counts the class token)."""
  if not 0.0 < keep_rate <= 1.0:
    raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
  return math.ceil(keep_rate * (num_tokens - 1))


def tokens_after(num_tokens: int, keep_rate: float, fuse_token: bool) -> int:
  """Sequence length after a reorganisation (class token and fused token included)."""
  k = kept_tokens(num_tokens, keep_rate)
  if k >= num_tokens - 1:
    return num_tokens
  return k + 1 + int(fuse_token)


def reorganize(x, probs, keep_rate: float, fuse_token: bool):
  """x: (B, N, D) residual stream after the attention residual; probs: (B, H, N, N) post-softmax attention,
  or only its class-token row (B, H, 1, N) (what a fused-attention block computes; only row 0 is read).

  Returns (x', info) with info = {'idx': (B, k) kept indices over the non-class tokens in descending score
  order, 'cls_attn': (B, N - 1) scores}, or (x, None) when nothing is dropped (k = N - 1).
  """
  n = x.shape[1]
  k = kept_tokens(n, keep_rate)
  if k >= n - 1:
    return x, None
  if k < 1:
    raise ValueError(f"keep_rate {keep_rate} keeps no token out of {n - 1}")
  scores = jnp.mean(probs[:, :, 0, 1:], axis=1).astype(jnp.float32)      # (B, N - 1)
  _, idx = jax.lax.top_k(scores, k)                                      # descending, sorted
  others = x[:, 1:]
  kept = jnp.take_along_axis(others, idx[..., None], axis=1)
  parts = [x[:, :1], kept]
  if fuse_token:
    # Weights of the dropped tokens: their scores, zero where kept (no complement index needed).
    dropped = jnp.ones_like(scores).at[jnp.arange(scores.shape[0])[:, None], idx].set(0.0)
    w = (scores * dropped).astype(x.dtype)
    parts.append(jnp.einsum("bn,bnd->bd", w, others)[:, None])
  return jnp.concatenate(parts, axis=1), {"idx": idx, "cls_attn": scores}
