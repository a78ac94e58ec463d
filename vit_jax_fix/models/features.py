"""Features for dense prediction: which blocks, in which layout, and a `features_only` backbone.

Every family has `model.forward_intermediates(images, indices, *, norm, output_fmt, intermediates_only,
return_prefix_tokens, stop_early)` with timm's semantics (`VisionTransformer.forward_intermediates`, the
methods of Cait and the pyramid models); this module holds what they share:

* `take_indices(n, indices)`: None -> every one of the n blocks (stages); an int k -> the last k; a list ->
  those (negative from the end). Returns (sorted distinct indices, the last one). Outputs come back in block
  order, once each, as timm's loop appends them.
* `to_format(tokens, grid, fmt)`: (B, H*W, C) row-major tokens -> 'NHWC' (B, H, W, C; the default, JAX's
  layout), 'NCHW' (B, C, H, W; timm's default) or 'NLC' (B, H*W, C).
* `FeatureExtractor(model, out_indices, norm=False)`: the backbone of a detection / segmentation neck:
  `extractor(images)` -> list of NHWC maps, `extractor.feature_info` -> per map its channels (`num_chs`),
  stride in pixels (`reduction`) and the block / stage it reads (`module`), as timm's `features_only` models.
  `vit_jax_fix.create_model(name, features_only=True, out_indices=...)` builds one.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

FORMATS = ("NHWC", "NCHW", "NLC")


def take_indices(n: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
  """(sorted distinct block indices to return, the last of them) out of n; see the module docstring."""
  if indices is None:
    indices = n
  if isinstance(indices, int):
    if not 0 < indices <= n:
      raise ValueError(f"indices={indices}: the last-n count must be 1 to {n}")
    take = list(range(n - indices, n))
  else:
    take = []
    for i in indices:
      j = n + i if i < 0 else i
      if not 0 <= j < n:
        raise ValueError(f"indices: block {i} is out of range for {n} blocks (0 to {n - 1}, or negative)")
      take.append(int(j))
    if not take:
      raise ValueError("indices: an empty list selects no block")
  take = sorted(set(take))
  return take, take[-1]


def check_format(fmt: str) -> str:
  if fmt not in FORMATS:
    raise ValueError(f"output_fmt must be one of {FORMATS}, got {fmt!r}")
  return fmt


def to_format(tokens, grid: tuple[int, int] | None, fmt: str):
  """(B, H*W, C) tokens in row-major patch order -> `fmt` (see the module docstring)."""
  if fmt == "NLC":
    return tokens
  b, n, c = tokens.shape
  if grid is None or grid[0] * grid[1] != n:
    raise ValueError(f"{n} tokens form no {grid} grid: use output_fmt='NLC'")
  x = tokens.reshape(b, grid[0], grid[1], c)
  return x if fmt == "NHWC" else jnp.transpose(x, (0, 3, 1, 2))


class FeatureExtractor(nnx.Module):
  """A backbone returning feature maps: `extractor(images)` -> list of (B, H_i, W_i, C_i) maps of the blocks
  (ViT family, one stride) or stages (Shunted, strides 4 to 32) in `out_indices` (as `forward_intermediates`'
  `indices`; default: every stage, or the last 4 blocks of a ViT, whose common stride a neck such as ViTDet's
  simple pyramid rescales). `norm=True` applies the model's final norm to each block output (ViT family).
  Only the blocks up to the last requested one run. `feature_info`: per map {'num_chs', 'reduction',
  'module'}; `channels()`, `reductions()` as in timm."""

  def __init__(self, model: nnx.Module, out_indices: int | Sequence[int] | None = None, *, norm: bool = False):
    info = model.feature_info
    if out_indices is None:
      out_indices = min(4, len(info))
    self.out_indices, _ = take_indices(len(info), out_indices)
    self.model = model
    self.norm = bool(norm)
    self.feature_info = [dict(info[i]) for i in self.out_indices]

  def channels(self) -> list[int]:
    return [f["num_chs"] for f in self.feature_info]

  def reductions(self) -> list[int]:
    return [f["reduction"] for f in self.feature_info]

  def __call__(self, images) -> list:
    return self.model.forward_intermediates(images, self.out_indices, norm=self.norm, output_fmt="NHWC",
                                            intermediates_only=True)
