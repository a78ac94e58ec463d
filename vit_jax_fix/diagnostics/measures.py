"""Collapse measures as pure `jnp` functions of one block's tokens or attention maps, per image.

Every function takes a batch and returns one value per image (shape (B,) or (B, K)), in float32, so the
caller can average over images (with a padding mask) and over several batches. Shapes:

- tokens  Z: (B, N, D), the output of a block (or the embedding), `num_prefix` leading prefix tokens
  (the class token) followed by the patch tokens, which form an (h, w) grid in row-major order when
  `grid` is given;
- attention A: (B, H, Nq, Nk), post-softmax (rows sum to 1). Nq = Nk for ViT blocks; a Shunted block's
  key axis is shorter (downsampled keys), which every attention measure here allows.

Measures (from the papers: AugViT arXiv 2106.15941, DeepViT arXiv 2103.11886, anti-oversmoothing
arXiv 2203.05962; where the papers leave a choice open, the choice made is stated):

1. `feature_diversity` (AugViT, after Dong et al. 2021). r(Z) = ||Z - 1 z^T||_F with z the token mean,
   which is the exact minimiser of the Frobenius distance to a matrix of identical rows. Returned raw and
   relative, r(Z) / ||Z||_F in [0, 1]. **Norm: Frobenius** (the paper's composite l1,inf norm would need
   a linear program for its minimiser). Rank-1 tokens with identical rows give 0.
2. `token_similarity` (anti-oversmoothing "patch uniformity"): U(Z) = 1/(n(n-1)) sum_{i != j}
   cos(z_i, z_j) over the n patch tokens (prefix tokens excluded). Computed in O(nD) as
   (||sum_i u_i||^2 - sum_i ||u_i||^2) / (n(n-1)) with u_i = z_i / ||z_i||.
3. `attention_column_cosine` (DeepViT cross-layer similarity): for maps A^p, A^q of the same shape,
   M_{h,t} = <A^p[h,:,t], A^q[h,:,t]> / (||A^p[h,:,t]|| ||A^q[h,:,t]||): column t (how key token t feeds
   every query). The per-image value is the mean over heads h and tokens t; `collect` averages it over
   images and counts "similar blocks" (see `collect.py`).
4. `frequency_energy` (anti-oversmoothing): the energy of the patch tokens by 2-D DFT bin over the (h, w)
   grid, summed over channels, as shares of the total (Parseval): band 0 is the DC bin, bands 1..K split
   the other bins by normalised radial frequency rho = |f| / max|f| into K equal-width intervals of (0, 1].
   The high-frequency share is 1 - E_DC / E = ||Z_p - 1 mean(Z_p)^T||_F^2 / ||Z_p||_F^2 on the patch
   tokens Z_p: the squared relative feature diversity of the patch tokens (so it is 0 for a constant
   feature map). Without a grid (after EViT reorganisation) only the 1-D DC share over the tokens is
   defined; `hf_share_1d` computes that.
5. `attention_highpass` (AttnScale's decomposition A = A_LP + A_HP with A_LP = 1/Nk 1 1^T):
   ||A - A_LP||_F / ||A||_F per head, averaged over heads. 0 for uniform attention (the low-pass
   filter), close to 1 for one-hot attention when Nk is large. For row-stochastic A,
   ||A - A_LP||_F^2 = ||A||_F^2 - Nq / Nk.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

EPS = 1e-12


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def feature_diversity(z, *, include_prefix: bool = True, num_prefix: int = 0):
  """(raw, relative), each (B,): r(Z) = ||Z - 1 mean(Z)^T||_F and r(Z) / ||Z||_F (Frobenius norm)."""
  z = _f32(z)
  if not include_prefix and num_prefix:
    z = z[:, num_prefix:]
  centred = z - jnp.mean(z, axis=1, keepdims=True)
  raw = jnp.sqrt(jnp.sum(centred ** 2, axis=(1, 2)))
  total = jnp.sqrt(jnp.sum(z ** 2, axis=(1, 2)))
  return raw, raw / jnp.maximum(total, EPS)


def token_similarity(z, *, num_prefix: int = 0):
  """(B,): mean pairwise cosine similarity of the patch tokens (i != j), prefix tokens excluded."""
  z = _f32(z)[:, num_prefix:]
  n = z.shape[1]
  if n < 2:
    return jnp.full((z.shape[0],), jnp.nan, jnp.float32)
  norm = jnp.sqrt(jnp.sum(z ** 2, axis=-1, keepdims=True))
  u = z / jnp.maximum(norm, EPS)
  s = jnp.sum(u, axis=1)                                      # (B, D)
  self_terms = jnp.sum(u ** 2, axis=(1, 2))                   # n unless a token is all-zero
  return (jnp.sum(s ** 2, axis=-1) - self_terms) / (n * (n - 1))


def normalize_columns(a):
  """A / ||A[..., :, t]||_2 over the query axis (-2): each key column becomes a unit vector."""
  a = _f32(a)
  return a / jnp.maximum(jnp.sqrt(jnp.sum(a ** 2, axis=-2, keepdims=True)), EPS)


def attention_column_cosine(a_p, a_q, *, per_head: bool = False):
  """Cosine of the same column of two maps (B, H, Nq, Nk): (B,) mean over heads and columns, or (B, H)."""
  if a_p.shape != a_q.shape:
    raise ValueError(f"attention maps of different shapes {a_p.shape} vs {a_q.shape} cannot be compared")
  cos = jnp.sum(normalize_columns(a_p) * normalize_columns(a_q), axis=-2)   # (B, H, Nk)
  return jnp.mean(cos, axis=-1) if per_head else jnp.mean(cos, axis=(1, 2))


def attention_similarity_matrix(maps, *, threshold: float = 0.9):
  """maps: (L, B, H, Nq, Nk) stacked maps of L blocks of one shape. Returns per image:
  'matrix' (L, L, B): M[p, q] averaged over heads and columns;
  'adjacent_per_head' (L - 1, B, H): M[p, p+1] per head (mean over columns);
  'adjacent_frac_above' (L - 1, B): fraction of (head, column) pairs with cos(A^p, A^{p+1}) > threshold."""
  u = normalize_columns(maps)
  l, b, h, _, nk = u.shape
  matrix = jnp.einsum("pbhit,qbhit->pqb", u, u) / (h * nk)
  if l < 2:
    empty = jnp.zeros((0, b, h), jnp.float32)
    return {"matrix": matrix, "adjacent_per_head": empty, "adjacent_frac_above": empty[..., 0]}
  adj = jnp.sum(u[:-1] * u[1:], axis=-2)                      # (L-1, B, H, Nk)
  return {"matrix": matrix, "adjacent_per_head": jnp.mean(adj, axis=-1),
          "adjacent_frac_above": jnp.mean((adj > threshold).astype(jnp.float32), axis=(-2, -1))}


def radial_bands(h: int, w: int, num_bands: int) -> np.ndarray:
  """(h, w) int array of the band of each 2-D DFT bin: 0 for the DC bin, 1..num_bands for the others by
  normalised radial frequency rho = |f| / max|f| in equal-width intervals of (0, 1]."""
  if num_bands < 1:
    raise ValueError(f"num_bands must be >= 1, got {num_bands}")
  fy = np.fft.fftfreq(h)[:, None]
  fx = np.fft.fftfreq(w)[None, :]
  rho = np.sqrt(fy ** 2 + fx ** 2)
  rho = rho / max(rho.max(), EPS)
  band = 1 + np.minimum(np.floor(rho * num_bands - 1e-9).astype(np.int64), num_bands - 1)
  band = np.maximum(band, 1)
  band[0, 0] = 0
  return band


def frequency_energy(z, grid, *, num_prefix: int = 0, num_bands: int = 4):
  """Patch-token energy shares by 2-D DFT band over the (h, w) grid: (B, num_bands + 1), band 0 = DC.
  Shares sum to 1 (Parseval); the high-frequency share is 1 - share[:, 0]."""
  z = _f32(z)[:, num_prefix:]
  b, n, d = z.shape
  h, w = grid
  if n != h * w:
    raise ValueError(f"{n} patch tokens do not form a {h}x{w} grid")
  f = jnp.fft.fft2(z.reshape(b, h, w, d), axes=(1, 2))
  power = jnp.sum(jnp.real(f) ** 2 + jnp.imag(f) ** 2, axis=-1).reshape(b, h * w)   # (B, h*w)
  onehot = jnp.asarray(np.eye(num_bands + 1, dtype=np.float32)[radial_bands(h, w, num_bands).reshape(-1)])
  per_band = power @ onehot                                                          # (B, K + 1)
  return per_band / jnp.maximum(jnp.sum(per_band, axis=-1, keepdims=True), EPS)


def hf_share_1d(z, *, num_prefix: int = 0):
  """(B,): 1 - E_DC / E of the 1-D DFT over the token axis of the patch tokens (no grid needed)."""
  z = _f32(z)[:, num_prefix:]
  n = z.shape[1]
  dc = n * jnp.sum(jnp.mean(z, axis=1) ** 2, axis=-1)
  return 1.0 - dc / jnp.maximum(jnp.sum(z ** 2, axis=(1, 2)), EPS)


def attention_highpass(a):
  """(B,): ||A - 1/Nk||_F / ||A||_F per head (the share AttnScale calls high-pass), mean over heads."""
  a = _f32(a)
  nk = a.shape[-1]
  hp = jnp.sqrt(jnp.sum((a - 1.0 / nk) ** 2, axis=(-2, -1)))
  tot = jnp.sqrt(jnp.sum(a ** 2, axis=(-2, -1)))
  return jnp.mean(hp / jnp.maximum(tot, EPS), axis=-1)
