"""AugViT's augmented shortcuts and block-circulant projections.

`CirculantLinear` stores the official `weight_list` (one length-b vector per b x b circulant block of a
K_out x K_in grid, b = min(D_in, D_out) / num_cir) and computes y = x W^T + bias in one of two ways:

- 'fft': y_I = IFFT( sum_J FFT(c_IJ) * FFT(x_J) ), O(D log b) per token, the cost the paper claims;
- 'dense': the official form, W = weight_list[index_matrix] gathered into a (D_out, D_in) matrix, then a
  matmul. Kept for checking and for accelerators whose matrix units prefer it;
- 'auto' (default): one of the two per backend (`AUTO_IMPL`, from measurements; FFT on CPU).

The paths of an AugViT sub-layer read the same input; `apply_group` computes them together (one shared FFT
of the input, or one GEMM for the dense form).

Both are exact up to float rounding (tests assert agreement to float32 precision). The official
`index_matrix` buffer is never stored: `circulant_index_matrix` recomputes it for the dense form and for
the PyTorch exporter.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax_fix.models import layers

CIRCULANT_IMPLS = ("fft", "dense", "auto")

# circulant_impl='auto' resolves by jax.default_backend() at construction. Measured (benchmarks/circulant_impl.py,
# AugViT-S block, D=384, block 96, batch 8 x 197 tokens, forward and gradient, interleaved): on CPU the FFT
# form is faster (see README, Performance). Backends without an entry were not measured here; they get the
# dense form, one GEMM per sub-layer, on the assumption that matrix units win at these sizes -- measure with
# benchmarks/circulant_impl.py and add the backend to this table.
AUTO_IMPL = {"cpu": "fft"}


def resolve_impl(impl: str) -> str:
  if impl not in CIRCULANT_IMPLS:
    raise ValueError(f"circulant_impl must be one of {CIRCULANT_IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  import jax
  return AUTO_IMPL.get(jax.default_backend(), "dense")


def circulant_index_matrix(din: int, dout: int, num_cir: int) -> np.ndarray:
  """The official int64 (D_out, D_in) gather index: block (I, J) at offset (I*K_in + J)*b plus the
  circulant pattern C[r, c] = (r - c) mod b."""
  b, k_in, k_out = circulant_geometry(din, dout, num_cir)
  r = np.arange(b)[:, None]
  c = np.arange(b)[None, :]
  pattern = (r - c) % b
  offsets = (np.arange(k_out)[:, None] * k_in + np.arange(k_in)[None, :]) * b   # (K_out, K_in)
  full = offsets[:, :, None, None] + pattern[None, None]                           # (K_out, K_in, b, b)
  return full.transpose(0, 2, 1, 3).reshape(dout, din).astype(np.int64)


def circulant_geometry(din: int, dout: int, num_cir: int) -> tuple[int, int, int]:
  m = min(din, dout)
  if m % num_cir:
    raise ValueError(f"circulant projection: min(D_in, D_out) = {m} is not divisible by num_cir = {num_cir}; "
                     f"choose num_cir among the divisors of {m}")
  b = m // num_cir
  return b, din // b, dout // b


class CirculantLinear(nnx.Module):

  def __init__(self, din: int, dout: int, num_cir: int, *, rngs: nnx.Rngs, impl: str = "auto", dtype=None,
               precision=None):
    impl = resolve_impl(impl)
    self.din, self.dout, self.num_cir = din, dout, num_cir
    self.block, self.k_in, self.k_out = circulant_geometry(din, dout, num_cir)
    self.impl = impl
    self.dtype = dtype
    self.precision = precision
    # Official init: kaiming_uniform(a=sqrt(5)) on the (K_out, K_in, b) view = U(+-1/sqrt(D_in)).
    init = layers.torch_default_uniform(din)
    self.weight_list = nnx.Param(init(rngs.params(), (self.k_out * self.k_in * self.block,)))
    self.bias = nnx.Param(init(rngs.params(), (dout,)))

  def torch_buffers(self):
    """The official code keeps its gather index in the state_dict (checked on import, re-emitted on export)."""
    return {"index_matrix": circulant_index_matrix(self.din, self.dout, self.num_cir)}

  def dense_weight(self):
    """The materialised (D_out, D_in) matrix of the official code."""
    idx = circulant_index_matrix(self.din, self.dout, self.num_cir)
    return self.weight_list[...][idx]

  def __call__(self, x):
    return apply_group([self], x)[0]


def _fft_group(projs, x):
  """Block-circulant products of several projections that read the same x, in the frequency domain:
  one rfft of x shared by all paths; per path, the spectrum of its weights, the block mixing
  sum_J FFT(c_IJ) * FFT(x_J) as a broadcast multiply-and-sum over J (XLA fuses it into one loop; the
  complex einsum lowered to a slower batched dot) and one irfft. float32 (jnp.fft has no bf16).
  Stacking the paths into one irfft was measured slower on CPU (strided slices after it)."""
  p0 = projs[0]
  b, k_in, k_out = p0.block, p0.k_in, p0.k_out
  lead = x.shape[:-1]
  xf = jnp.fft.rfft(x.astype(jnp.float32).reshape(*lead, k_in, b), axis=-1)[..., None, :, :]  # (..., 1, K_in, F)
  out = []
  for p in projs:
    cf = jnp.fft.rfft(p.weight_list[...].reshape(k_out, k_in, b), axis=-1)                  # (K_out, K_in, F)
    y = jnp.fft.irfft(jnp.sum(xf * cf, axis=-2), n=b, axis=-1).reshape(*lead, p.dout)
    out.append(y + p.bias[...])
  return out


def _dense_group(projs, x, dtype):
  """Materialised matrices of several projections reading the same x, concatenated into one GEMM."""
  w = jnp.concatenate([p.dense_weight() for p in projs], axis=0)                       # (P * D_out, D_in)
  y = jnp.matmul(x.astype(dtype), w.T.astype(dtype), precision=projs[0].precision)
  y = y.reshape(*x.shape[:-1], len(projs), projs[0].dout)
  return y + jnp.stack([p.bias[...] for p in projs]).astype(dtype)


def apply_group(projs, x):
  """[p(x) for p in projs], computed together when they are circulant projections of one geometry and impl
  (AugViT's two paths of a sub-layer read the same LayerNorm output): the FFT of x is shared, or the dense
  matrices form one GEMM. Other projections (plain Linear) run one by one."""
  same = all(isinstance(p, CirculantLinear) for p in projs) and len(
      {(p.din, p.dout, p.num_cir, p.impl, p.dtype, p.precision) for p in projs}) == 1
  if not same:
    return [p(x) for p in projs]
  dtype = projs[0].dtype or x.dtype
  if projs[0].impl == "dense":
    y = _dense_group(projs, x, dtype)
    return [y[..., i, :] for i in range(len(projs))]
  return [y.astype(dtype) for y in _fft_group(projs, x)]


AUG_MODES = (None, "linear", "circulant", "linear2", "circulant2")


def make_aug_projection(mode: str, dim: int, *, num_cir: int, impl: str, rngs: nnx.Rngs, dtype=None,
                        precision=None):
  if mode.startswith("circulant"):
    return CirculantLinear(dim, dim, num_cir, impl=impl, rngs=rngs, dtype=dtype, precision=precision)
  return layers.linear(dim, dim, rngs=rngs, dtype=dtype, precision=precision)


def two_paths(mode: str | None) -> bool:
  return mode in ("linear2", "circulant2")


def check_mode(mode):
  if mode not in AUG_MODES:
    raise ValueError(f"aug_shortcut must be one of {AUG_MODES}, got {mode!r}")
  return mode


def rescale_factor(mode: str | None, paper_form: bool) -> float:
  """The official two-path code multiplies the whole residual update by 3/4 (not in the paper)."""
  return 0.75 if two_paths(mode) and not paper_form else 1.0


__all__ = ["CirculantLinear", "apply_group", "circulant_index_matrix", "make_aug_projection", "two_paths", "AUG_MODES",
           "CIRCULANT_IMPLS", "AUTO_IMPL", "resolve_impl", "rescale_factor", "check_mode"]
