"""Small building blocks shared by every model family.

Conventions (see ../../README.md, "Numerics"):
- Activations are NHWC / (B, N, D); parameters are float32; `dtype` is the compute dtype (e.g. bf16) that
  reaches every matmul, while LayerNorm, BatchNorm and softmax always compute in float32.
- Attribute names mirror the official PyTorch state_dict keys (`qkv`, `proj`, `fc1`, `norm1`, ...), so that
  `vit_jax_fix.interop` converts weights by walking the module tree instead of keeping long name tables.
- Initialisation follows the official code: Linear trunc_normal(0.02) with zero bias, LayerNorm (1, 0),
  patch conv PyTorch's default uniform(+-1/sqrt(fan_in)).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any

trunc_normal_02 = nnx.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)


def torch_default_uniform(fan_in: int) -> Callable:
  """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


_SQRT_HALF = math.sqrt(0.5)


def gelu(x):
  """Exact (erf) GELU, as torch.nn.GELU(): x/2 (1 + erf(x / sqrt 2)), torch's own formula.
  flax's default is the tanh approximation; jax.nn.gelu(approximate=False) uses the erfc form, whose XLA
  CPU expansion (exp and two polynomials) measured 2.5x slower than erf's rational polynomial, with a max
  deviation from torch's float64 GELU of 1.1e-6 (erf) vs 3.8e-7 (erfc) on N(0, 9) inputs."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


def linear(din: int, dout: int, *, rngs: nnx.Rngs, dtype: Dtype = None, use_bias: bool = True,
           kernel_init: Callable = trunc_normal_02, precision=None) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, kernel_init=kernel_init,
                    bias_init=nnx.initializers.zeros_init(), precision=precision, rngs=rngs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_last(x, scale, bias, eps: float):
  """LayerNorm over the last axis, float32, torch's two-pass variance: y = (x - mu) * (rsqrt(var + eps) * scale)
  + bias, the arithmetic of nnx.LayerNorm. Its backward is written out (one pass per row):
  dx = rstd (g' - mean(g') - xhat mean(g' xhat)) with g' = g scale, xhat = (x - mu) rstd; d scale = sum g xhat,
  d bias = sum g. Autodiff of the two-pass form chains the mean, the centring and the variance separately;
  the written form took ~3% off the DeiT-S train step's CPU time (benchmarks/README.md)."""
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  xc = x - jnp.mean(x, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
  return xc * (rstd * scale) + bias, (xc, rstd, scale)


def _layer_norm_bwd(eps, res, g):
  xc, rstd, scale = res
  rows = tuple(range(g.ndim - 1))
  xhat = xc * rstd
  gs = g * scale
  dx = rstd * (gs - jnp.mean(gs, axis=-1, keepdims=True) - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True))
  return dx, jnp.sum(g * xhat, axis=rows), jnp.sum(g, axis=rows)


layer_norm_last.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.LayerNorm):
  """nnx.LayerNorm (same parameters and state-dict keys) computed by `layer_norm_last`, float32 out."""

  def __call__(self, x, *, mask=None):
    if mask is not None or self.axis_name is not None or self.reduction_axes != -1 or self.scale is None \
        or self.bias is None:
      return super().__call__(x, mask=mask)
    return layer_norm_last(x.astype(jnp.float32), self.scale[...].astype(jnp.float32),
                           self.bias[...].astype(jnp.float32), self.epsilon)


def layer_norm(dim: int, eps: float = 1e-6, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm in float32 with torch's two-pass variance (use_fast_variance=False) and explicit eps."""
  return LayerNorm(dim, epsilon=eps, dtype=jnp.float32, use_fast_variance=False, rngs=rngs)


def batch_norm(dim: int, *, rngs: nnx.Rngs, axis: int = -1, eps: float = 1e-5) -> nnx.BatchNorm:
  """BatchNorm with torch's defaults: momentum 0.1 (flax 0.9), eps 1e-5, float32 statistics."""
  return nnx.BatchNorm(dim, axis=axis, momentum=0.9, epsilon=eps, dtype=jnp.float32,
                       use_fast_variance=False, rngs=rngs)


# How a stride-1 depthwise conv runs, per backend: XLA:CPU's grouped convolution is about 10x slower than the
# same sum written as k*k shifted multiply-adds, forward and backward (8 x 56 x 56 x 512, 3x3: 509 vs 41 ms
# forward, 3330 vs 316 ms with gradients; outputs equal to float rounding; shunted_t train step 10.6 vs 2.3 s
# at batch 8). A hand-written backward (flipped-kernel sum for the input, one reduction per tap for the
# kernel) was 2x faster alone but 18% slower inside the model, so autodiff stays. Other backends keep the
# convolution (unmeasured there).
DEPTHWISE_IMPL = {"cpu": "shifted"}


class DepthwiseConv(nnx.Conv):
  """A stride-1 depthwise nnx.Conv (same parameters, so the same state-dict layout) that can compute the
  convolution as a sum of k*k shifted, per-channel-scaled copies of the padded input (`DEPTHWISE_IMPL`)."""

  def __call__(self, x, out_sharding=None):
    if out_sharding is not None or DEPTHWISE_IMPL.get(jax.default_backend(), "conv") != "shifted":
      return super().__call__(x, out_sharding=out_sharding)
    kernel = self.kernel[...]                               # (kh, kw, 1, C)
    dtype = self.dtype or jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    acc = jnp.promote_types(dtype, jnp.float32)            # bf16 inputs: accumulate in f32, as the conv does
    (pt, pb), (pl, pr) = self.padding
    kh, kw = self.kernel_size
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    out = None
    for i in range(kh):
      for j in range(kw):
        term = xp[:, i:i + ho, j:j + wo, :].astype(acc) * kernel[i, j, 0].astype(acc)
        out = term if out is None else out + term
    if self.bias is not None:
      out = out + self.bias[...].astype(acc)
    return out.astype(dtype)


def conv(din: int, dout: int, kernel: int, stride: int = 1, padding: int = 0, *, rngs: nnx.Rngs,
         groups: int = 1, use_bias: bool = True, dtype: Dtype = None, kernel_init: Callable | None = None,
         bias_init: Callable | None = None, precision=None) -> nnx.Conv:
  """A Conv2d with PyTorch's explicit symmetric padding (XLA 'SAME' pads stride-2 convs asymmetrically) and,
  unless given, PyTorch's default init of kernel and bias. A stride-1 depthwise conv (groups = din = dout)
  is a `DepthwiseConv`: same parameters, a faster computation on CPU."""
  fan_in = din // groups * kernel * kernel
  depthwise = groups == din == dout and stride == 1
  return (DepthwiseConv if depthwise else nnx.Conv)(
      din, dout, (kernel, kernel), (stride, stride), padding=((padding, padding),) * 2,
      feature_group_count=groups, use_bias=use_bias, dtype=dtype,
      kernel_init=kernel_init or torch_default_uniform(fan_in),
      bias_init=bias_init or torch_default_uniform(fan_in), precision=precision, rngs=rngs)


class DropPathRate(nnx.Variable):
  """The drop probability of one DropPath, a (non-trainable) variable rather than a static attribute, so
  blocks that differ only in their rate share one graph and can run under one `jax.lax.scan`."""


class DropPath(nnx.Module):
  """Stochastic depth per sample (timm semantics: kept samples are scaled by 1/(1-p)).

  `active=False` (the model's maximum rate is 0) removes the RNG stream and the work entirely.
  """

  def __init__(self, rate: float, *, rngs: nnx.Rngs, active: bool | None = None):
    self.active = bool(rate > 0) if active is None else bool(active)
    self.rate = DropPathRate(jnp.asarray(rate, jnp.float32))
    self.deterministic = False
    self.rngs = rngs["dropout"].fork() if self.active else nnx.data(None)

  def __call__(self, x):
    if not self.active or self.deterministic:
      return x
    keep = 1.0 - self.rate[...]
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.rngs(), keep, shape)
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class Mlp(nnx.Module):
  """fc1 -> exact GELU -> dropout -> fc2 -> dropout (timm Mlp)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, drop: float = 0.0, dtype: Dtype = None,
               precision=None):
    self.fc1 = linear(dim, hidden, rngs=rngs, dtype=dtype, precision=precision)
    self.fc2 = linear(hidden, dim, rngs=rngs, dtype=dtype, precision=precision)
    self.drop = nnx.Dropout(drop, rngs=rngs)

  def __call__(self, x):
    x = self.drop(gelu(self.fc1(x)))
    return self.drop(self.fc2(x))


class PatchEmbed(nnx.Module):
  """Non-overlapping patches by a strided conv (`patch_embed.proj`), flattened row-major to tokens."""

  def __init__(self, patch_size: int, in_chans: int, dim: int, *, rngs: nnx.Rngs, dtype: Dtype = None,
               precision=None):
    self.patch_size = patch_size
    self.proj = conv(in_chans, dim, patch_size, patch_size, rngs=rngs, dtype=dtype, precision=precision)

  def __call__(self, x):
    x = self.proj(x)
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c), (h, w)


class ConvStem(nnx.Module):
  """DeepViT's CNN patch stem (`PatchEmbed_CNN`): conv7/2-BN-ReLU, conv3-BN-ReLU, then a strided
  projection conv of kernel = stride = patch_size // 2 (8 for the registered patch 16)."""

  def __init__(self, patch_size: int, in_chans: int, dim: int, *, rngs: nnx.Rngs, dtype: Dtype = None,
               precision=None, stem_width: int = 64):
    if patch_size % 2:
      raise ValueError(f"the CNN stem halves the image first, so patch_size must be even, got {patch_size}")
    self.patch_size = patch_size
    self.conv1 = conv(in_chans, stem_width, 7, 2, 3, use_bias=False, rngs=rngs, dtype=dtype,
                      precision=precision)
    self.bn1 = batch_norm(stem_width, rngs=rngs)
    self.conv2 = conv(stem_width, stem_width, 3, 1, 1, use_bias=False, rngs=rngs, dtype=dtype,
                      precision=precision)
    self.bn2 = batch_norm(stem_width, rngs=rngs)
    self.proj = conv(stem_width, dim, patch_size // 2, patch_size // 2, rngs=rngs, dtype=dtype,
                     precision=precision)

  def __call__(self, x):
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = jax.nn.relu(self.bn2(self.conv2(x)))
    x = self.proj(x)
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c), (h, w)


def as_tuple(value, n: int, name: str, unit: str = "blocks") -> tuple:
  """Broadcast a scalar per-block (or per-stage: `unit`) option to n entries, or check a given sequence has
  length n."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"{name} has {len(value)} entries but the model has {n} {unit}")
    return tuple(value)
  return (value,) * n
