"""FeatScale as frequency-band scaling of token features (anti-oversmoothing, Wang et al. 2022).

The official FeatScale splits a branch output a (B, N, D) into its token mean DC (the DC bin of the 1-D
DFT over tokens) and the rest HC = a - DC, and re-weights them per channel:

    a <- a + m * (lamb1 * DC + lamb2 * HC)

with m = 2 in the official ViT code (its "bugfix" commit adds the term twice; `double=True`, default for
the official ViT names) and m = 1 in the CaiT code (`double=False`).

`FeatScale(bands=2)` computes exactly this, by FFT (`impl='fft'`: scale bin 0 by lamb1 and every other bin
by lamb2) or by the token mean (`impl='mean'`, bit-compatible with the official code). The two are the same
function: the DC band's projector is the token mean, so scaling bin 0 by g0 and the rest by g1 is
g1 * a + (g0 - g1) * mean(a). `impl='auto'` (the default) therefore takes the mean for two bands: the FFT over
197 tokens (a prime length) made a FeatScale-S forward 1.6x slower on CPU (benchmarks/README.md), for nothing.

`bands=K > 2` is the generalisation over the 2-D patch grid: band 0 is still DC (mean over all tokens, prefix
tokens included, as the official code does); the remainder R = a - DC of the patch tokens is split by the radial
frequency rho = |f| / max|f| of its 2-D FFT over the (h, w) grid into K - 1 equal-width bands of rho (the
grid's zero-frequency bin goes to band 1); the remainder of the prefix (cls) tokens belongs to band 1.
Parameters: `lamb1` (D,) for DC and `lamb2` (D,) for K = 2, or (K - 1, D) for K > 2, all zeros at init,
so a FeatScale block starts as the plain block.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

FEATSCALE_IMPLS = ("auto", "fft", "mean")


def radial_band_index(h: int, w: int, num_bands: int) -> np.ndarray:
  """(h, w) int array: the band (1 .. num_bands-1) of each 2-D DFT bin, by normalised radial frequency."""
  fy = np.fft.fftfreq(h)[:, None]
  fx = np.fft.fftfreq(w)[None, :]
  rho = np.sqrt(fy ** 2 + fx ** 2)
  rho = rho / max(rho.max(), 1e-12)
  k = num_bands - 1
  return 1 + np.minimum((rho * k).astype(np.int64), k - 1)


class FeatScale(nnx.Module):

  def __init__(self, dim: int, *, bands: int = 2, double: bool = False, impl: str = "auto"):
    if bands < 2:
      raise ValueError(f"feat_scale_bands must be >= 2 (DC and the rest), got {bands}")
    if impl not in FEATSCALE_IMPLS:
      raise ValueError(f"feat_scale_impl must be one of {FEATSCALE_IMPLS}, got {impl!r}")
    if impl == "mean" and bands > 2:
      raise ValueError(f"feat_scale_impl='mean' computes only the two-band form; with feat_scale_bands={bands} "
                       "use 'auto' or 'fft' (the radial bands need the 2-D FFT)")
    self.bands = bands
    self.multiplier = 2.0 if double else 1.0
    self.impl = impl if impl != "auto" else ("mean" if bands == 2 else "fft")
    self.lamb1 = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.lamb2 = nnx.Param(jnp.zeros((dim,) if bands == 2 else (bands - 1, dim), jnp.float32))

  def __call__(self, a, *, grid: tuple[int, int] | None = None, num_prefix: int = 0):
    """a: (B, N, D). `grid` and `num_prefix` locate the patch tokens (needed only for bands > 2)."""
    m = self.multiplier
    l1, l2 = self.lamb1[...], self.lamb2[...]
    dtype = a.dtype
    if self.bands == 2:
      if self.impl == "mean":
        dc = jnp.mean(a, axis=1, keepdims=True)
        return a + m * (l1 * dc + l2 * (a - dc))
      # Per-channel gains on the token DFT: bin 0 (DC) by 1 + m*lamb1, all other bins by 1 + m*lamb2.
      f = jnp.fft.fft(a.astype(jnp.float32), axis=1)
      n = a.shape[1]
      is_dc = (jnp.arange(n) == 0)[None, :, None]
      gain = jnp.where(is_dc, 1 + m * l1, 1 + m * l2)
      return jnp.fft.ifft(f * gain, axis=1).real.astype(dtype)
    if grid is None:
      raise ValueError("FeatScale with more than 2 bands needs the patch grid; it cannot follow a token "
                       "reorganisation (EViT) that breaks the grid. Use feat_scale_bands=2 there.")
    h, w = grid
    b, n, d = a.shape
    if n != num_prefix + h * w:
      raise ValueError(f"FeatScale: {n} tokens do not form {num_prefix} prefix tokens + a {h}x{w} grid")
    a32 = a.astype(jnp.float32)
    dc = jnp.mean(a32, axis=1, keepdims=True)
    r = a32 - dc
    prefix, patches = r[:, :num_prefix], r[:, num_prefix:].reshape(b, h, w, d)
    band = jnp.asarray(radial_band_index(h, w, self.bands))                 # (h, w)
    gains = l2[band - 1]                                                    # (h, w, D)
    pf = jnp.fft.fft2(patches, axes=(1, 2))
    scaled = jnp.fft.ifft2(pf * gains, axes=(1, 2)).real.reshape(b, h * w, d)
    delta = jnp.concatenate([prefix * l2[0], scaled], axis=1) + dc * l1
    return (a32 + m * delta).astype(dtype)
