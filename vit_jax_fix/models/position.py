"""Position-embedding resizing to a new patch grid, with PyTorch's interpolation arithmetic.

`resize_pos_embed(pos, new_grid, num_prefix=1, method='bicubic', antialias=False)` keeps the `num_prefix`
leading (class/distillation) slots and resamples the patch part (row-major grid) to `new_grid`. One
implementation serves both callers: numpy arrays (weight loading, `vit_jax_fix.interop.position` re-exports
these names) are resampled in float64; jax arrays, traced ones included (a model built with
`dynamic_img_size=True` resizes its `pos_embed` inside the forward pass), in their own dtype at 'highest'
matmul precision. The grids are static at trace time, so the interpolation matrices are always numpy
constants and only the two small matrix products run in the graph.

What is computed, and why not `jax.image.resize`: resizing is separable, so each axis is one (out, in)
interpolation matrix, built here in float64 numpy to reproduce `torch.nn.functional.interpolate(...,
align_corners=False)`:
- antialias=False (DeiT's fine-tuning code, timm's npz loader with bilinear): half-pixel source coordinates,
  bilinear = tent between the two neighbours (coordinate clamped at 0), bicubic = Keys cubic with a = -0.75
  over 4 neighbours with indices clamped to the border.
- antialias=True (timm's `resample_abs_pos_embed` default): PIL-style, the kernel (tent, or Keys cubic with
  a = -0.5) widened by the downscale factor, taps outside the image dropped and weights renormalised.
`jax.image.resize(method='bicubic')` uses a = -0.5 and always antialiases when shrinking, so its results
differ from torch's default bicubic by up to a few percent of the values; the matrices here match torch to
float32 rounding (tested against `F.interpolate`).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def interp_matrix(n_in: int, n_out: int, method: str = "bicubic", antialias: bool = False) -> np.ndarray:
  """(n_out, n_in) float64 matrix M with out = M @ in, as torch's interpolate(align_corners=False)."""
  if method not in ("bilinear", "bicubic"):
    raise ValueError(f"method must be 'bilinear' or 'bicubic', got {method!r}")
  scale = n_in / n_out
  m = np.zeros((n_out, n_in))
  if antialias:
    support_scale = max(scale, 1.0)
    support = (1.0 if method == "bilinear" else 2.0) * support_scale
    for i in range(n_out):
      center = scale * (i + 0.5)
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), n_in)
      j = np.arange(lo, hi)
      x = (j - center + 0.5) / support_scale
      w = np.maximum(0.0, 1.0 - np.abs(x)) if method == "bilinear" else _cubic(x, -0.5)
      total = w.sum()
      m[i, lo:hi] = w / total if total else w
    return m
  for i in range(n_out):
    src = scale * (i + 0.5) - 0.5
    if method == "bilinear":
      src = max(src, 0.0)
      j0 = min(int(math.floor(src)), n_in - 1)
      j1 = min(j0 + 1, n_in - 1)
      t = src - j0
      m[i, j0] += 1 - t
      m[i, j1] += t
    else:
      j0 = int(math.floor(src))
      t = src - j0
      for k, w in zip(range(-1, 3), _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)):
        m[i, min(max(j0 + k, 0), n_in - 1)] += w
  return m


def _is_jax(a) -> bool:
  return isinstance(a, jax.Array)   # concrete or traced


def resize_grid(grid, new_hw: Sequence[int], method: str = "bicubic", antialias: bool = False):
  """(H, W, D) -> (H', W', D): numpy in float64, a jax array (traceable) in float32 or wider."""
  h, w = grid.shape[:2]
  mh = interp_matrix(h, int(new_hw[0]), method, antialias)
  mw = interp_matrix(w, int(new_hw[1]), method, antialias)
  if _is_jax(grid):
    ct = jnp.promote_types(grid.dtype, jnp.float32)
    out = jnp.einsum("ih,hwd,jw->ijd", mh.astype(ct), grid.astype(ct), mw.astype(ct),
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(grid.dtype)
  grid = np.asarray(grid)
  out = np.einsum("ih,hwd,jw->ijd", mh, grid.astype(np.float64), mw)
  return out.astype(grid.dtype)


def resize_pos_embed(pos, new_grid: Sequence[int], num_prefix: int = 1,
                     old_grid: Sequence[int] | None = None, method: str = "bicubic",
                     antialias: bool = False):
  """(1, num_prefix + H*W, D) -> (1, num_prefix + H'*W', D). `old_grid` defaults to a square grid. A jax
  array stays one (see the module docstring); anything else becomes numpy."""
  xp = jnp if _is_jax(pos) else np
  pos = pos if xp is jnp else np.asarray(pos)
  if pos.ndim != 3 or pos.shape[0] != 1:
    raise ValueError(f"pos_embed must be (1, N, D), got {pos.shape}")
  n = pos.shape[1] - num_prefix
  if old_grid is None:
    g = math.isqrt(n)
    if g * g != n:
      raise ValueError(f"pos_embed has {n} patch positions, not a square grid: pass old_grid=(H, W)")
    old_grid = (g, g)
  if old_grid[0] * old_grid[1] != n:
    raise ValueError(f"old_grid {tuple(old_grid)} does not hold the {n} patch positions of pos_embed")
  if tuple(old_grid) == tuple(new_grid):
    return pos
  grid = pos[0, num_prefix:].reshape(old_grid[0], old_grid[1], -1)
  out = resize_grid(grid, new_grid, method, antialias).reshape(1, -1, pos.shape[-1])
  return xp.concatenate([pos[:, :num_prefix], out], axis=1)
