"""Shunted Transformer (Ren et al., CVPR 2022): shunted self-attention, a four-stage pyramid.

Reference: the paper (arXiv 2111.15193) and SSA.py of OliverRensu/Shunted-Transformer @ 6861101d8f4f592d,
whose classes are named in brackets below. Activations are NHWC between stages and (B, N, C) inside a stage,
with tokens in PyTorch's row-major (h, w) order, so a (B, N, C) <-> (B, H, W, C) change is a plain reshape.

- Stem `patch_embed1` (`Head`): conv 7x7/2 (pad 3, no bias) -> BN -> ReLU, `num_conv` x [conv 3x3 -> BN -> ReLU],
  conv 2x2/2, LayerNorm(eps 1e-5). Stages 2-4: `OverlapPatchEmbed`, conv 3x3/2 pad 1 + LayerNorm(eps 1e-5).
  All paddings are explicit (XLA 'SAME' pads stride-2 convs asymmetrically).
- Shunted self-attention (`Attention`): with sr_ratio r > 1 the heads split in two groups; the first half of
  q's heads attends to keys/values aggregated by a conv r x r / r, the second half by (r/2) x (r/2) / (r/2), each
  followed by LayerNorm(eps 1e-5) and exact GELU; local enhancement (depthwise 3x3 on V) is added to V before
  the attention product. With r = 1 (stage 4): ordinary MHSA with the depthwise conv of V added after it.
- Detail-specific FFN (`Mlp`): fc1 -> GELU(y + DWConv3x3(y)) -> fc2 (`mlp.dwconv.dwconv`, as the official keys).
- Block and stage norms use `norm_eps` (1e-6 in the official constructors); the classifier reads the mean of
  the last stage's normalised tokens.

Attribute names mirror the official state_dict keys (`patch_embed1.conv.0`, `block2.1.attn.sr1`, ...), so
`vit_jax_fix.interop` converts weights (BatchNorm buffers included) with no name table. Generalisations of
the official class (identical when the official arguments are used): any even sr_ratio r > 1 (official:
8, 4, 2), any number of stages, `in_chans`, and a stage-1 width other than 64 (the official stem is
hard-wired to 64 channels; here the stem convs stay 64 wide and the 2x2 conv maps to `embed_dims[0]`).

This module defines the model only: its names are registered in `zoo.py`, the official constructor's
arguments are translated in `vit_jax_fix.interop.official`, like every other family.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax_fix.models import attention, features, layers

STEM_WIDTH = 64


def _init(kernel: int, dout: int, groups: int = 1) -> dict:
  """The official init of every Shunted conv, as `layers.conv` arguments: kernel N(0, sqrt(2 / fan_out)) with
  fan_out = k^2 * C_out / groups, bias zero (created zero rather than overwritten: eval_shape stays cheap)."""
  fan_out = kernel * kernel * dout // groups
  return dict(kernel_init=nnx.initializers.normal(stddev=math.sqrt(2.0 / fan_out)),
              bias_init=nnx.initializers.zeros_init())


class ReLU(nnx.Module):
  """Parameter-free slot of the official `nn.Sequential` stem (keeps the Sequential indices)."""

  def __call__(self, x):
    return jax.nn.relu(x)


class Head(nnx.Module):
  """Stage-1 stem `patch_embed1`: `conv` is the official nn.Sequential (indices 0, 1, 2, ...)."""

  def __init__(self, num_conv: int, in_chans: int, dim: int, *, rngs: nnx.Rngs, width: int = STEM_WIDTH,
               dtype=None, precision=None):
    kw = dict(rngs=rngs, dtype=dtype, precision=precision)
    seq = [layers.conv(in_chans, width, 7, 2, 3, use_bias=False, **kw, **_init(7, width)),
           layers.batch_norm(width, rngs=rngs), ReLU()]
    for _ in range(num_conv):
      seq += [layers.conv(width, width, 3, 1, 1, use_bias=False, **kw, **_init(3, width)),
              layers.batch_norm(width, rngs=rngs), ReLU()]
    seq.append(layers.conv(width, dim, 2, 2, 0, **kw, **_init(2, dim)))
    self.conv = nnx.List(seq)
    self.norm = layers.layer_norm(dim, 1e-5, rngs=rngs)

  def __call__(self, x):
    for layer in self.conv:
      x = layer(x)
    b, h, w, c = x.shape
    return self.norm(x.reshape(b, h * w, c)), (h, w)


class OverlapPatchEmbed(nnx.Module):
  """Stages 2-4: conv 3x3 / 2, padding 1, then LayerNorm(eps 1e-5)."""

  def __init__(self, din: int, dim: int, *, rngs: nnx.Rngs, dtype=None, precision=None):
    self.proj = layers.conv(din, dim, 3, 2, 1, rngs=rngs, dtype=dtype, precision=precision, **_init(3, dim))
    self.norm = layers.layer_norm(dim, 1e-5, rngs=rngs)

  def __call__(self, x):
    x = self.proj(x)
    b, h, w, c = x.shape
    return self.norm(x.reshape(b, h * w, c)), (h, w)


class DWConv(nnx.Module):
  """Depthwise 3x3 conv on a token sequence laid out as an (H, W) map (`mlp.dwconv.dwconv`)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=None, precision=None):
    self.dwconv = layers.conv(dim, dim, 3, 1, 1, groups=dim, rngs=rngs, dtype=dtype, precision=precision,
                              **_init(3, dim, dim))

  def __call__(self, x, hw):
    b, n, c = x.shape
    return self.dwconv(x.reshape(b, *hw, c)).reshape(b, n, c)


class Mlp(nnx.Module):
  """Detail-specific FFN: fc1 -> GELU(y + DWConv(y)) -> dropout -> fc2 -> dropout."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, drop: float = 0.0, dtype=None, precision=None):
    self.fc1 = layers.linear(dim, hidden, rngs=rngs, dtype=dtype, precision=precision)
    self.dwconv = DWConv(hidden, rngs=rngs, dtype=dtype, precision=precision)
    self.fc2 = layers.linear(hidden, dim, rngs=rngs, dtype=dtype, precision=precision)
    self.drop = nnx.Dropout(drop, rngs=rngs)

  def __call__(self, x, hw):
    y = self.fc1(x)
    y = self.drop(layers.gelu(y + self.dwconv(y, hw)))
    return self.drop(self.fc2(y))


class ShuntedAttention(nnx.Module):
  """Shunted self-attention (`Attention`). Returns (out, maps): maps is a tuple (coarse, fine) of post-softmax maps
  (B, h/2, N, N_g) for sr_ratio > 1, or one map (B, h, N, N) for sr_ratio = 1; None when not asked for."""

  def __init__(self, dim: int, num_heads: int, sr_ratio: int, *, rngs: nnx.Rngs, qkv_bias: bool = True,
               qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0, dtype=None,
               precision=None):
    if dim % num_heads:
      raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    self.num_heads, self.head_dim = num_heads, dim // num_heads
    self.scale = qk_scale or self.head_dim ** -0.5
    self.sr_ratio = int(sr_ratio)
    self.precision = precision
    lin = dict(rngs=rngs, dtype=dtype, precision=precision)
    self.q = layers.linear(dim, dim, use_bias=qkv_bias, **lin)
    self.attn_drop = nnx.Dropout(attn_drop, rngs=rngs)
    self.proj = layers.linear(dim, dim, **lin)
    self.proj_drop = nnx.Dropout(proj_drop, rngs=rngs)
    if self.sr_ratio > 1:
      if self.sr_ratio % 2 or num_heads % 2:
        raise ValueError(f"shunted attention with sr_ratio {sr_ratio} > 1 needs an even sr_ratio and an even "
                         f"number of heads (two head groups at rates r and r/2), got {num_heads} heads")
      r = self.sr_ratio
      self.sr1 = layers.conv(dim, dim, r, r, 0, **lin, **_init(r, dim))
      self.norm1 = layers.layer_norm(dim, 1e-5, rngs=rngs)
      self.sr2 = layers.conv(dim, dim, r // 2, r // 2, 0, **lin, **_init(r // 2, dim))
      self.norm2 = layers.layer_norm(dim, 1e-5, rngs=rngs)
      self.kv1 = layers.linear(dim, dim, use_bias=qkv_bias, **lin)
      self.kv2 = layers.linear(dim, dim, use_bias=qkv_bias, **lin)
      half = dim // 2
      self.local_conv1 = layers.conv(half, half, 3, 1, 1, groups=half, **lin, **_init(3, half, half))
      self.local_conv2 = layers.conv(half, half, 3, 1, 1, groups=half, **lin, **_init(3, half, half))
    elif self.sr_ratio == 1:
      self.kv = layers.linear(dim, 2 * dim, use_bias=qkv_bias, **lin)
      self.local_conv = layers.conv(dim, dim, 3, 1, 1, groups=dim, **lin, **_init(3, dim, dim))
    else:
      raise ValueError(f"sr_ratio must be >= 1, got {sr_ratio}")

  def _attend(self, q, k, v, return_map: bool = False):
    """q (B, N, h, d), k/v (B, M, h, d) -> out (B, N, h*d), probs (B, h, N, M) float32. Without a map asked
    for and no active attention dropout, the fused kernel of `attention.implementation_for` computes out
    (one call per head group) and probs is None."""
    impl = ("explicit" if return_map or attention.drop_active(self.attn_drop)
            else attention.implementation_for(q.dtype, self.head_dim, "shunted"))
    if impl != "explicit":
      out = attention.fused_attention(q, k, v, self.scale, impl)
      b, n, h, d = out.shape
      return out.reshape(b, n, h * d), None
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, precision=self.precision) * self.scale
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    a = self.attn_drop(probs).astype(v.dtype)
    out = jnp.einsum("bhnm,bmhd->bnhd", a, v, precision=self.precision)
    b, n, h, d = out.shape
    return out.reshape(b, n, h * d), probs

  def _reduced_kv(self, xmap, sr, norm, kv, local_conv, heads):
    """K/V of one head group: conv aggregation -> LN -> GELU -> kv, then V += DWConv(V) (before attention)."""
    y = sr(xmap)
    b, hr, wr, c = y.shape
    y = layers.gelu(norm(y.reshape(b, hr * wr, c)))
    kvs = kv(y).reshape(b, hr * wr, 2, heads, self.head_dim)  # channel order (k|v, head, d)
    k, v = kvs[:, :, 0], kvs[:, :, 1]
    v = v + local_conv(v.reshape(b, hr, wr, heads * self.head_dim)).reshape(v.shape)
    return k, v

  def __call__(self, x, hw, *, return_map: bool = False):
    b, n, c = x.shape
    h, d = self.num_heads, self.head_dim
    q = self.q(x).reshape(b, n, h, d)
    if self.sr_ratio > 1:
      xmap = x.reshape(b, *hw, c)
      g = h // 2
      k1, v1 = self._reduced_kv(xmap, self.sr1, self.norm1, self.kv1, self.local_conv1, g)
      k2, v2 = self._reduced_kv(xmap, self.sr2, self.norm2, self.kv2, self.local_conv2, g)
      o1, p1 = self._attend(q[:, :, :g], k1, v1, return_map)   # first half of the heads: coarse rate r
      o2, p2 = self._attend(q[:, :, g:], k2, v2, return_map)   # second half: rate r / 2
      out = jnp.concatenate([o1, o2], axis=-1)
      maps = (p1, p2)
    else:
      kvs = self.kv(x).reshape(b, n, 2, h, d)
      k, v = kvs[:, :, 0], kvs[:, :, 1]
      out, maps = self._attend(q, k, v, return_map)
      # Stage 4: local enhancement added after the attention product.
      out = out + self.local_conv(v.reshape(b, *hw, c)).reshape(b, n, c)
    out = self.proj_drop(self.proj(out))
    return out, (maps if return_map else None)


class ShuntedBlock(nnx.Module):
  """Pre-norm block: x + DP(SSA(LN1 x)); x + DP(FFN(LN2 x))."""

  def __init__(self, dim: int, num_heads: int, sr_ratio: int, *, rngs: nnx.Rngs, mlp_ratio: float = 4.0,
               qkv_bias: bool = True, qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0,
               drop_path: float = 0.0, norm_eps: float = 1e-6, dtype=None, precision=None):
    self.norm1 = layers.layer_norm(dim, norm_eps, rngs=rngs)
    self.attn = ShuntedAttention(dim, num_heads, sr_ratio, rngs=rngs, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                 attn_drop=attn_drop, proj_drop=drop, dtype=dtype, precision=precision)
    self.drop_path = layers.DropPath(drop_path, rngs=rngs)
    self.norm2 = layers.layer_norm(dim, norm_eps, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs, drop=drop, dtype=dtype, precision=precision)

  def __call__(self, x, hw, *, return_map: bool = False):
    y, maps = self.attn(self.norm1(x), hw, return_map=return_map)
    x = x + self.drop_path(y)
    x = x + self.drop_path(self.mlp(self.norm2(x), hw))
    return x, maps


_STAGES = "stages (len(depths))"


class ShuntedTransformer(nnx.Module):
  """Shunted Transformer. Call: `model(images_nhwc)` -> logits (B, num_classes) (pooled features when
  num_classes=0); `model(images, return_intermediates=True)` -> (logits, inter) with
  'tokens' (every block output in order, (B, H_s W_s, C_s)), 'stage_tokens' ({'block<s>.<j>': block output
  before the stage norm}, s and j as in the official keys), 'attn' (per block: a tuple (coarse, fine) of
  post-softmax maps in stages with sr_ratio > 1, one map where sr_ratio = 1), 'stages' (normalised stage
  outputs as (B, H_s, W_s, C_s) maps, e.g. for dense heads), 'grids' (the (H_s, W_s) of every stage) and
  'pre_logits' (B, C_last). Any input size works (the stage-1 map, H / 4, must be at least sr_ratios[0]).

  `img_size` and `patch_size` are accepted and unused, as in the official class.
  """

  def __init__(self, *, img_size: Any = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
               embed_dims: Sequence[int] = (64, 128, 256, 512), depths: Sequence[int] = (1, 2, 4, 1),
               num_heads: Sequence[int] = (2, 4, 8, 16), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
               sr_ratios: Sequence[int] = (8, 4, 2, 1), num_conv: int = 0, qkv_bias: bool = True,
               qk_scale: float | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
               drop_path_rate: float = 0.0, norm_eps: float = 1e-6, dtype=None, precision=None,
               rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(params=0, dropout=1)
    depths = tuple(int(d) for d in depths)
    n = len(depths)
    if n < 1:
      raise ValueError("depths must have at least one stage")
    dims = layers.as_tuple(embed_dims, n, "embed_dims", _STAGES)
    heads = layers.as_tuple(num_heads, n, "num_heads", _STAGES)
    mlps = layers.as_tuple(mlp_ratios, n, "mlp_ratios", _STAGES)
    srs = layers.as_tuple(sr_ratios, n, "sr_ratios", _STAGES)
    # Unused, as in the official class (kept hashable: static attributes key the jit caches).
    self.img_size = tuple(img_size) if isinstance(img_size, (list, tuple)) else img_size
    self.patch_size = patch_size
    self.num_stages, self.depths, self.embed_dims = n, depths, tuple(dims)
    self.sr_ratios = tuple(int(r) for r in srs)
    self.num_classes = num_classes
    dpr = [float(r) for r in np.linspace(0.0, drop_path_rate, sum(depths))]
    cur = 0
    for i in range(n):
      if i == 0:
        embed = Head(num_conv, in_chans, dims[0], rngs=rngs, dtype=dtype, precision=precision)
      else:
        embed = OverlapPatchEmbed(dims[i - 1], dims[i], rngs=rngs, dtype=dtype, precision=precision)
      blocks = nnx.List([
          ShuntedBlock(dims[i], heads[i], srs[i], rngs=rngs, mlp_ratio=mlps[i], qkv_bias=qkv_bias,
                       qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[cur + j],
                       norm_eps=norm_eps, dtype=dtype, precision=precision)
          for j in range(depths[i])])
      cur += depths[i]
      setattr(self, f"patch_embed{i + 1}", embed)
      setattr(self, f"block{i + 1}", blocks)
      setattr(self, f"norm{i + 1}", layers.layer_norm(dims[i], norm_eps, rngs=rngs))
    self.head = (layers.linear(dims[-1], num_classes, rngs=rngs, precision=precision)
                 if num_classes else nnx.data(None))

  def _stage(self, i: int, x, *, return_map: bool = False):
    """Stage i (0-based) on its input (the image, or the previous stage's (B, H, W, C) map). Returns (normalised
    tokens (B, H_s W_s, C_s), (H_s, W_s), per block (output before the stage norm, attention maps))."""
    size = x.shape[1:3]
    x, hw = getattr(self, f"patch_embed{i + 1}")(x)
    if i == 0 and min(hw) < self.sr_ratios[0]:
      raise ValueError(f"input {size} gives a {hw} stage-1 map, smaller than the coarsest key/value "
                       f"aggregation ({self.sr_ratios[0]}); use at least {4 * self.sr_ratios[0]} px")
    per_block = []
    for blk in getattr(self, f"block{i + 1}"):
      x, maps = blk(x, hw, return_map=return_map)
      per_block.append((x, maps))
    return getattr(self, f"norm{i + 1}")(x), hw, per_block

  @property
  def feature_info(self) -> list[dict]:
    """Per stage: its channels, stride in pixels and name, as timm's `feature_info`."""
    return [dict(num_chs=c, reduction=2 ** (i + 2), module=f"stages.{i}") for i, c in enumerate(self.embed_dims)]

  def forward_intermediates(self, images, indices: int | Sequence[int] | None = None, *, norm: bool = False,
                            output_fmt: str = "NHWC", intermediates_only: bool = False,
                            return_prefix_tokens: bool = False, stop_early: bool = True):
    """The stage maps of a pyramid, with the semantics of timm's hierarchical models: indices over the stages
    (None: all four; k: the last k; a list), each the normalised stage output (what the next stage reads)
    as 'NHWC' (B, H/4..H/32, W/4..W/32, C_s; default), 'NCHW' or 'NLC'. `norm` and `return_prefix_tokens`
    are accepted for a uniform call and change nothing (the stage norms are part of the network; no prefix
    tokens). stop_early: stages after the last requested one do not run. Returns (final features, maps):
    the final features are the last run stage's map in `output_fmt`; or the maps only with
    intermediates_only=True."""
    del norm, return_prefix_tokens
    features.check_format(output_fmt)
    take, last = features.take_indices(self.num_stages, indices)
    x, maps = images, []
    for i in range(last + 1 if stop_early else self.num_stages):
      x, hw, _ = self._stage(i, x)
      if i in take:
        maps.append(features.to_format(x, hw, output_fmt))
      x = x.reshape(x.shape[0], *hw, x.shape[-1])
    if intermediates_only:
      return maps
    return features.to_format(x.reshape(x.shape[0], -1, x.shape[-1]), x.shape[1:3], output_fmt), maps

  def __call__(self, images, *, return_intermediates: bool = False):
    x = images
    b = x.shape[0]
    inter = {"tokens": [], "stage_tokens": {}, "attn": [], "stages": [], "grids": []}
    for i in range(self.num_stages):
      x, hw, per_block = self._stage(i, x, return_map=return_intermediates)
      for j, (tokens, maps) in enumerate(per_block):
        inter["tokens"].append(tokens)
        inter["stage_tokens"][f"block{i + 1}.{j}"] = tokens
        inter["attn"].append(maps)
      inter["grids"].append(hw)
      inter["stages"].append(x.reshape(b, *hw, x.shape[-1]))
      if i != self.num_stages - 1:
        x = x.reshape(b, *hw, x.shape[-1])
    pre_logits = jnp.mean(x, axis=1)
    inter["pre_logits"] = pre_logits
    out = self.head(pre_logits) if self.head is not None else pre_logits
    return (out, inter) if return_intermediates else out
