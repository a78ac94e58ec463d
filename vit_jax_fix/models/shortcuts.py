"""AugViT's augmented shortcuts and block-circulant projections.

`CirculantLinear` stores the official `weight_list` (one length-b vector per b x b circulant block of a
K_out x K_in grid, b = min(D_in, D_out) / num_cir) and computes y = x W^T + bias in one of two ways:

- 'fft' (default): y_I = IFFT( sum_J FFT(c_IJ) * FFT(x_J) ), O(D log b) per token, the cost the paper claims;
- 'dense': the official form, W = weight_list[index_matrix] gathered into a (D_out, D_in) matrix, then a
  matmul. Kept for checking and for accelerators whose matrix units prefer it.

Both are exact up to float rounding (tests assert agreement to float32 precision). The official
`index_matrix` buffer is never stored: `circulant_index_matrix` recomputes it for the dense form and for
the PyTorch exporter.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax_fix.models import layers

CIRCULANT_IMPLS = ("fft", "dense")


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

  def __init__(self, din: int, dout: int, num_cir: int, *, rngs: nnx.Rngs, impl: str = "fft", dtype=None,
               precision=None):
    if impl not in CIRCULANT_IMPLS:
      raise ValueError(f"circulant_impl must be one of {CIRCULANT_IMPLS}, got {impl!r}")
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
    dtype = self.dtype or x.dtype
    if self.impl == "dense":
      y = jnp.matmul(x.astype(dtype), self.dense_weight().T.astype(dtype), precision=self.precision)
      return y + self.bias[...].astype(dtype)
    # FFT form (float32: jnp.fft has no bf16). Circular convolution of each block's vector with x_J.
    lead = x.shape[:-1]
    xb = x.astype(jnp.float32).reshape(*lead, self.k_in, self.block)
    c = self.weight_list[...].reshape(self.k_out, self.k_in, self.block)
    xf = jnp.fft.rfft(xb, axis=-1)                                   # (..., K_in, F)
    cf = jnp.fft.rfft(c, axis=-1)                                    # (K_out, K_in, F)
    yf = jnp.einsum("...jf,ijf->...if", xf, cf)
    y = jnp.fft.irfft(yf, n=self.block, axis=-1).reshape(*lead, self.dout)
    return (y + self.bias[...]).astype(dtype)


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


__all__ = ["CirculantLinear", "circulant_index_matrix", "make_aug_projection", "two_paths", "AUG_MODES",
           "CIRCULANT_IMPLS", "rescale_factor", "check_mode"]
