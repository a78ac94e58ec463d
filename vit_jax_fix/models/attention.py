"""Multi-head self-attention with the attention-map fixes as options, and CaiT's class attention.

One `Attention` serves every ViT family; each fix is a small, optional step on the attention map A:

  logits = q k^T * scale                                   (B, H, N, N)
  [talking heads]  logits <- proj_l over heads             CaiT (pre-softmax head mixing)
  A = softmax(logits)  (float32)
  [talking heads]  A <- proj_w over heads                  CaiT (post-softmax head mixing)
  attn_drop(A)
  [re-attention]   A <- BN_heads(Theta A) * r              DeepViT (after softmax and attn_drop)
  [AttnScale]      A <- A_LP + (1 + lamb_h) (A - A_LP)     Anti-oversmoothing, A_LP = 1/N
  out = proj(A v)

AttnScale never materialises A when nothing else needs it: A_hat v = (1 + lamb) A v - lamb * mean_tokens(v),
so a fused attention kernel stays usable (`jax.nn.dot_product_attention`).

Which kernel runs (`implementation_for`): the explicit form above whenever the map itself is needed (talking
heads, re-attention, attention dropout in training, maps asked for by diagnostics or return_intermediates);
otherwise `jax.nn.dot_product_attention` with `implementation` from `AUTO_IMPL` per backend (None: jax's
choice, which in jax 0.10 is its XLA form; 'xla'; 'cudnn': cuDNN's flash kernel, taken only where its
constraints hold, else 'xla'), refined per call site by `SITE_IMPL` (on CPU, EViT's reorganising blocks,
Shunted and CaiT's class attention keep the explicit form, measured faster there). EViT's reorganising
blocks need only the class token's row of A: on the fused path it is computed on its own (one softmax row per
head, q_cls K^T), and the output still comes from the fused kernel.
Details and the cuDNN constraints: docs/models.md, "Attention kernels".
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax_fix.models import layers


IMPLEMENTATIONS = (None, "xla", "cudnn", "explicit")

# The kernel of the fused path per backend (jax.default_backend()), read when a model is traced. None lets jax
# choose (its XLA form in jax 0.10); 'explicit' builds the map even where no fix needs it. Measure with
# benchmarks/device_check.py and set the backend's entry from its fused-vs-explicit table (benchmarks/README.md);
# backends without an entry get None. Only CPU has been measured (DeiT-S train step: fused XLA form 1.93 s,
# explicit 2.02 s; benchmarks/README.md); SITE_IMPL refines it per call site.
AUTO_IMPL: dict[str, str | None] = {"cpu": None}
# Per (backend, call site), where a measurement chose otherwise than AUTO_IMPL. Sites: 'attention' (the ViT
# block), 'evit' (a reorganising block: fused output + the class-token row), 'shunted' (per head group),
# 'class_attention' (CaiT, one query). On CPU the explicit form stays where it measured faster (interleaved
# train steps, benchmarks/README.md: EViT-S 0.7 fused 1.02-1.10x the explicit step's CPU time, Shunted-T 1.5-2.0x;
# CaiT's single row gains nothing from a kernel).
SITE_IMPL: dict[tuple[str, str], str | None] = {
    ("cpu", "evit"): "explicit", ("cpu", "shunted"): "explicit", ("cpu", "class_attention"): "explicit"}
_FORCED: list = []


@contextlib.contextmanager
def use_implementation(impl):
  """Within the block, trace every fused-capable attention with `impl` (one of IMPLEMENTATIONS) instead of
  AUTO_IMPL. Trace time is what counts: jit a fresh function inside the block (a cached trace is not redone)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
  _FORCED.append(impl)
  try:
    yield
  finally:
    _FORCED.pop()


def cudnn_supported(dtype, head_dim: int) -> bool:
  """The static part of cuDNN flash attention's constraints (jax/_src/cudnn/fused_attention_stablehlo.py,
  check_layout and check_is_flash_attention, jax 0.10): fp16/bf16 inputs, head dim a multiple of 8 and at most
  128 (256 on Hopper and later; 128 is assumed here), on a CUDA backend. Sequence lengths are free without a
  bias or mask."""
  return (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)


def implementation_for(dtype, head_dim: int, site: str = "attention"):
  """The kernel a fused-capable attention (call site `site`, see SITE_IMPL) with q/k/v of `dtype` gets:
  'explicit', None, 'xla' or 'cudnn' (a 'cudnn' choice whose constraints do not hold falls back to 'xla', as no
  error can be caught at trace time). use_implementation overrides both tables."""
  backend = jax.default_backend()
  impl = _FORCED[-1] if _FORCED else SITE_IMPL.get((backend, site), AUTO_IMPL.get(backend))
  if impl == "cudnn" and not cudnn_supported(dtype, head_dim):
    return "xla"
  return impl


def fused_attention(q, k, v, scale: float, impl):
  """softmax(q k^T * scale) v without a map in the caller's code: q (B, N, H, Dh), k/v (B, M, H, Dh)."""
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)


def class_token_row(q, k, scale: float, precision=None):
  """The class token's attention row on its own: softmax(q_0 k^T * scale) per head, (B, H, 1, M) float32, the
  row 0 of the full map (B, H, N, M) in its layout, at O(M) instead of O(N M) per head."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q[:, :1], k, precision=precision) * scale
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _conv_heads_last(a, w, bias, precision):
  out = jax.lax.conv_general_dilated(jnp.moveaxis(a, 1, -1), w[None, None], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
  return jnp.moveaxis(out + bias, -1, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def mix_heads_1x1(a, w, bias, precision=None):
  """DeepViT's head mixing, a 1x1 conv from heads to heads: a (B, H, N, M), w (H_in, H_out), bias (H_out,).

  Forward as XLA's conv (the fastest form on CPU); the gradients as batched matmuls over the N x M
  positions, because XLA:CPU computes the conv's weight gradient ~10x slower (930 ms of DeepViT-S's 4.7 s
  train step at batch 8; benchmarks/profile_step.py)."""
  return _conv_heads_last(a, w, bias, precision)


def _mix_heads_fwd(a, w, bias, precision):
  return _conv_heads_last(a, w, bias, precision), (a, w)


def _mix_heads_bwd(precision, res, g):
  a, w = res
  b, h, n, m = a.shape
  a3, g3 = a.reshape(b, h, n * m), g.reshape(b, -1, n * m)
  da = jax.lax.dot_general(jnp.broadcast_to(w, (b,) + w.shape), g3, (((2,), (1,)), ((0,), (0,))),
                           precision=precision)                                   # (B, H_in, N M)
  dw = jax.lax.dot_general(a3, g3, (((2,), (2,)), ((0,), (0,))), precision=precision).sum(0)
  return da.reshape(a.shape), dw, g.sum((0, 2, 3))


mix_heads_1x1.defvjp(_mix_heads_fwd, _mix_heads_bwd)


def drop_active(drop: nnx.Dropout) -> bool:
  """Whether a dropout on the attention map changes it (rate > 0 and not in eval mode)."""
  return drop.rate > 0 and not drop.deterministic


class Attention(nnx.Module):

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, qkv_bias: bool = True,
               qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
               talking_heads: bool = False, attn_scale: bool = False, reattention: bool = False,
               reattention_scale: bool = False, dtype=None, precision=None):
    if dim % num_heads:
      raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.scale = qk_scale or self.head_dim ** -0.5
    self.dtype = dtype
    self.precision = precision
    self.talking_heads = talking_heads
    self.reattention = reattention
    # DeepViT's `transform_scale`: multiply the normalised map by the attention scale.
    self.reattention_scale = self.scale if reattention_scale else 1.0
    if attn_scale:
      self.lamb = nnx.Param(jnp.zeros((num_heads,), jnp.float32))
    else:
      self.lamb = nnx.data(None)
    if reattention:
      init = layers.torch_default_uniform(num_heads)
      self.reatten_matrix = nnx.Conv(num_heads, num_heads, (1, 1), kernel_init=init, bias_init=init,
                                     precision=precision, rngs=rngs)
      # Statistics per head over (B, N, N), on the (B, H, N, N) map as torch's BatchNorm2d sees it.
      self.var_norm = layers.batch_norm(num_heads, axis=1, rngs=rngs)
    self.qkv = layers.linear(dim, 3 * dim, use_bias=qkv_bias, rngs=rngs, dtype=dtype, precision=precision)
    if talking_heads:
      self.proj_l = layers.linear(num_heads, num_heads, rngs=rngs, precision=precision)
      self.proj_w = layers.linear(num_heads, num_heads, rngs=rngs, precision=precision)
    self.proj = layers.linear(dim, dim, rngs=rngs, dtype=dtype, precision=precision)
    self.attn_drop = nnx.Dropout(attn_drop, rngs=rngs)
    self.proj_drop = nnx.Dropout(proj_drop, rngs=rngs)

  def _heads_mix(self, dense: nnx.Linear, a):
    """Apply a Linear(H, H) over the head axis of (B, H, N, M)."""
    return jnp.moveaxis(dense(jnp.moveaxis(a, 1, -1)), -1, 1)

  def _mix_heads_1x1(self, a):
    """`reatten_matrix` (a 1x1 nnx.Conv, H -> H) over the head axis of a (B, H, N, M) map."""
    conv = self.reatten_matrix
    return mix_heads_1x1(a, conv.kernel[0, 0].astype(a.dtype), conv.bias[...].astype(a.dtype), self.precision)

  def needs_map(self) -> bool:
    """Whether the map A must be materialised (a fused kernel cannot express these fixes; dropout on A only
    while it is active, i.e. in training)."""
    return self.talking_heads or self.reattention or drop_active(self.attn_drop)

  def __call__(self, x, *, return_map: bool = False, cls_row: bool = False):
    """x: (B, N, D). Returns (out, A) with A the post-softmax map (B, H, N, N) before re-attention and
    AttnScale, in float32, or None when it was not asked for and not needed. cls_row=True (EViT) asks only
    for the class token's row: A is then (B, H, 1, N) unless the full map is built anyway."""
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]          # (B, N, H, Dh)
    lamb = None if self.lamb is None else self.lamb[...]
    impl = ("explicit" if (return_map or self.needs_map())
            else implementation_for(q.dtype, self.head_dim, "evit" if cls_row else "attention"))

    if impl != "explicit":
      # Fused path: no map is materialised by the caller's code (XLA or cuDNN picks the kernel).
      out = fused_attention(q, k, v, self.scale, impl)                         # (B, N, H, Dh)
      if lamb is not None:
        lam = lamb.astype(out.dtype)[None, None, :, None]
        out = (1 + lam) * out - lam * jnp.mean(v, axis=1, keepdims=True)
      probs = class_token_row(q, k, self.scale, self.precision) if cls_row else None
    else:
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision) * self.scale
      logits = logits.astype(jnp.float32)
      if self.talking_heads:
        logits = self._heads_mix(self.proj_l, logits)
      probs = jax.nn.softmax(logits, axis=-1)
      a = probs
      if self.talking_heads:
        a = self._heads_mix(self.proj_w, a)
      a = self.attn_drop(a)
      if self.reattention:
        # Head mixing (the official 1x1 conv over heads) and BatchNorm with the heads as channels.
        a = self.var_norm(self._mix_heads_1x1(a)) * self.reattention_scale
      if lamb is not None:
        # A_hat = A_LP + (1 + lamb)(A - A_LP) with A_LP = 1/N over the keys of this attention.
        lam = lamb[None, :, None, None]
        a = (1 + lam) * a - lam / a.shape[-1]
      out = jnp.einsum("bhqk,bkhd->bqhd", a.astype(v.dtype), v, precision=self.precision)
    out = self.proj_drop(self.proj(out.reshape(b, n, d)))
    return out, probs


class ClassAttention(nnx.Module):
  """CaiT class attention: only the class token queries; keys/values see [cls, patches]."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, qkv_bias: bool = True,
               qk_scale: float | None = None, dtype=None, precision=None):
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.scale = qk_scale or self.head_dim ** -0.5
    self.precision = precision
    self.q = layers.linear(dim, dim, use_bias=qkv_bias, rngs=rngs, dtype=dtype, precision=precision)
    self.k = layers.linear(dim, dim, use_bias=qkv_bias, rngs=rngs, dtype=dtype, precision=precision)
    self.v = layers.linear(dim, dim, use_bias=qkv_bias, rngs=rngs, dtype=dtype, precision=precision)
    self.proj = layers.linear(dim, dim, rngs=rngs, dtype=dtype, precision=precision)

  def __call__(self, u, *, return_map: bool = True):
    """u: (B, 1 + N, D) normalised [cls, patches]. Returns the class token update (B, 1, D) and the map
    (B, H, 1, 1 + N) float32, or None with return_map=False where the fused kernel runs (SITE_IMPL /
    AUTO_IMPL; with a single query the map is no larger than the output, so only a kernel that gains on
    its own, cuDNN, is expected to help)."""
    b, n, d = u.shape
    q = self.q(u[:, :1]).reshape(b, 1, self.num_heads, self.head_dim)
    k = self.k(u).reshape(b, n, self.num_heads, self.head_dim)
    v = self.v(u).reshape(b, n, self.num_heads, self.head_dim)
    impl = "explicit" if return_map else implementation_for(q.dtype, self.head_dim, "class_attention")
    if impl != "explicit":
      out = fused_attention(q, k, v, self.scale, impl)
      return self.proj(out.reshape(b, 1, d)), None
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * self.scale, k, precision=self.precision)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, precision=self.precision)
    return self.proj(out.reshape(b, 1, d)), probs
