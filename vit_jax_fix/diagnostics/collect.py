"""One jitted pass: model + images -> per-block collapse measures, averaged over images and batches.

`measure_fn(model, cfg)` builds a `jax.jit` function of (model state, images, mask) that runs the forward
with `return_intermediates=True` (eval mode: no dropout, BatchNorm on running statistics) and computes every
measure of `measures.py` on every block, returning **sums over the valid images** (mask > 0). `collect`
accumulates those sums over batches (tqdm progress bar) and divides by the image count.

Result (`collect` returns a plain dict of lists/floats, JSON-ready; NaN marks "not defined here"):

- token measures, index 0 = the embedding (tokens entering block 1), index i = output of block i
  (`token_depth` = [0, 1, ..., L]; [1, ..., L] for models without an 'embed' intermediate, e.g. Shunted):
  `feature_diversity` (raw ||Z - 1 z^T||_F), `feature_diversity_rel` (divided by ||Z||_F),
  `token_similarity` (mean pairwise cosine of patch tokens), `hf_energy_share` (1 - DC share of the 2-D
  DFT over the patch grid; the 1-D token-axis DFT where no grid exists, see `hf_domain`),
  `hf_band_share` (per depth a list [DC, band 1 .. band K] of energy shares, NaN without a grid);
- attention measures, index i - 1 = block i (`attn_depth` = [1, ..., L]): `attn_highpass`;
  `attn_similarity` the full (L, L) matrix M[p, q] = mean over images, heads and key columns t of
  cos(A^p[h, :, t], A^q[h, :, t]) (NaN where the two maps differ in shape);
  `attn_similarity_offset` (L - k values, M[p, p + k], k = cfg.offset, default 1: adjacent blocks),
  `attn_similarity_offset_per_head` (L - k lists of H values), `attn_similarity_offset_frac_above` (the
  other aggregation: fraction of (image, head, column) triples whose cosine exceeds the threshold);
  `similar_blocks` = the number of p with M[p, p + k] > threshold (default 0.9), i.e. the number of blocks
  whose map is highly similar to the map k blocks earlier, and `similar_block_ids` (1-based ids of block
  p + k).

Shapes that vary (EViT after a token reorganisation, Shunted stages, tuples of per-head-group maps) are
handled per block: the grid is inferred per stage from the image shape, band measures are NaN where no grid
exists, and the cross-layer similarity is computed only between blocks whose maps have identical shapes.
`notes` lists every such skip.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax_fix.diagnostics import measures as M

MEASURE_NAMES = ("feature_diversity", "feature_diversity_rel", "token_similarity", "hf_energy_share",
                 "attn_highpass", "attn_similarity_offset")


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
  threshold: float = 0.9              # "#similar blocks" threshold on the mean column cosine
  offset: int = 1                     # compare block p with block p + offset
  num_bands: int = 4                  # radial bands of the 2-D DFT (plus the DC bin)
  diversity_include_prefix: bool = True   # class token part of Z for the feature diversity
  norm: str = "frobenius"             # the only norm implemented; reported in the output

  def __post_init__(self):
    if self.norm != "frobenius":
      raise ValueError("only the Frobenius norm is implemented (its minimiser z is the token mean)")
    if self.offset < 1:
      raise ValueError(f"offset must be >= 1, got {self.offset}")


def _as_group_list(a) -> list | None:
  """A block's attention: one map, a tuple/list of per-head-group maps (Shunted), or None."""
  if a is None:
    return None
  if isinstance(a, (tuple, list)):
    maps = [m for m in a if m is not None]
    return maps or None
  return [a]


def infer_grid(num_patches: int, image_hw: tuple[int, int], model_grid=None):
  """(h, w) of a patch grid with num_patches tokens for images of image_hw, or None."""
  if model_grid is not None and model_grid[0] * model_grid[1] == num_patches:
    return tuple(int(g) for g in model_grid)
  hh, ww = image_hw
  stride = math.sqrt(hh * ww / max(num_patches, 1))
  s = int(round(stride))
  if s > 0 and hh % s == 0 and ww % s == 0 and (hh // s) * (ww // s) == num_patches:
    return hh // s, ww // s
  return None


def _masked_sum(values, mask):
  """Sum over the leading image axis of `values` (B, ...) where mask > 0."""
  m = mask.reshape((-1,) + (1,) * (values.ndim - 1)) > 0
  return jnp.sum(jnp.where(m, values, 0.0), axis=0)


def _block_signature(maps) -> tuple | None:
  return None if maps is None else tuple(tuple(m.shape[1:]) for m in maps)


def _measures(inter: Mapping, images, mask, *, num_prefix: int, model_grid, cfg: DiagnosticsConfig):
  """Sums over valid images of every measure, from the model's intermediates. Traced inside jit."""
  has_embed = inter.get("embed") is not None     # multi-stage models (Shunted) have no single embedding
  tokens = ([inter["embed"]] if has_embed else []) + list(inter["tokens"])
  attn = [_as_group_list(a) for a in inter["attn"]]
  image_hw = tuple(images.shape[1:3])
  out: dict[str, Any] = {"count": jnp.sum((mask > 0).astype(jnp.float32))}
  nan = jnp.full(images.shape[:1], jnp.nan, jnp.float32)
  nb = cfg.num_bands + 1

  div, div_rel, sim, hf, bands, hf_domain = [], [], [], [], [], []
  for z in tokens:
    n_patch = z.shape[1] - num_prefix
    grid = infer_grid(n_patch, image_hw, model_grid)
    r, rel = M.feature_diversity(z, include_prefix=cfg.diversity_include_prefix, num_prefix=num_prefix)
    div.append(r)
    div_rel.append(rel)
    sim.append(M.token_similarity(z, num_prefix=num_prefix))
    if grid is not None:
      e = M.frequency_energy(z, grid, num_prefix=num_prefix, num_bands=cfg.num_bands)
      hf.append(1.0 - e[:, 0])
      bands.append(e)
      hf_domain.append("2d")
    else:
      hf.append(M.hf_share_1d(z, num_prefix=num_prefix))
      bands.append(jnp.full(images.shape[:1] + (nb,), jnp.nan, jnp.float32))
      hf_domain.append("1d")
  for key, vals in (("feature_diversity", div), ("feature_diversity_rel", div_rel), ("token_similarity", sim),
                    ("hf_energy_share", hf), ("hf_band_share", bands)):
    out[key] = _masked_sum(jnp.stack(vals, axis=1), mask)

  # --- attention, per block
  hp = []
  for maps in attn:
    if maps is None:
      hp.append(nan)
      continue
    heads = [m.shape[1] for m in maps]
    hp.append(sum(M.attention_highpass(m) * h for m, h in zip(maps, heads)) / sum(heads))
  depth = len(attn)
  out["attn_highpass"] = _masked_sum(jnp.stack(hp, axis=1), mask) if depth else jnp.zeros((0,))

  # --- cross-layer similarity, within groups of blocks whose maps have identical shapes
  sigs = [_block_signature(m) for m in attn]
  b = images.shape[0]
  matrix = jnp.full((depth, depth, b), jnp.nan, jnp.float32)
  k = cfg.offset
  n_off = max(depth - k, 0)
  frac = jnp.full((n_off, b), jnp.nan, jnp.float32)
  max_heads = max([sum(s[0] for s in sig) for sig in sigs if sig is not None], default=0)
  per_head = jnp.full((n_off, b, max_heads), jnp.nan, jnp.float32)
  groups: dict[tuple, list[int]] = {}
  for i, sig in enumerate(sigs):
    if sig is not None:
      groups.setdefault(sig, []).append(i)
  for sig, idx in groups.items():
    ids = jnp.asarray(idx)
    weights = [s[0] * s[2] for s in sig]      # heads x key columns of each head group
    mat = 0.0
    for g, w in enumerate(weights):
      stacked = jnp.stack([attn[i][g] for i in idx])                   # (Lg, B, H, Nq, Nk)
      mat = mat + M.attention_similarity_matrix(stacked)["matrix"] * w
    mat = mat / sum(weights)
    matrix = matrix.at[ids[:, None], ids[None, :]].set(mat)
    for p in idx:
      q = p + k
      if q >= depth or sigs[q] != sig:
        continue
      cos_heads, above, tot = [], 0.0, 0.0
      for g, w in enumerate(weights):
        cos = jnp.sum(M.normalize_columns(attn[p][g]) * M.normalize_columns(attn[q][g]), axis=-2)  # (B,H,Nk)
        cos_heads.append(jnp.mean(cos, axis=-1))
        above = above + jnp.sum((cos > cfg.threshold).astype(jnp.float32), axis=(1, 2))
        tot = tot + w
      heads_cat = jnp.concatenate(cos_heads, axis=1)
      per_head = per_head.at[p, :, :heads_cat.shape[1]].set(heads_cat)
      frac = frac.at[p].set(above / tot)
  out["attn_similarity"] = _masked_sum(jnp.moveaxis(matrix, 2, 0), mask)
  out["attn_similarity_offset_frac_above"] = _masked_sum(jnp.moveaxis(frac, 1, 0), mask)
  out["attn_similarity_offset_per_head"] = _masked_sum(jnp.moveaxis(per_head, 1, 0), mask)

  static = {"hf_domain": hf_domain, "signatures": sigs, "depth": depth, "has_embed": has_embed,
            "token_shapes": [tuple(z.shape[1:]) for z in tokens]}
  return out, static


_JIT_CACHE: dict = {}


def measure_fn(model: nnx.Module, cfg: DiagnosticsConfig = DiagnosticsConfig()):
  """A function (images, mask) -> (sums, static) running the model and every measure in one jax.jit.
  The model's current parameters are passed as an argument (not baked in as constants), so a model with
  the same structure (e.g. the same model after training, in the same train/eval mode) reuses the compiled
  function."""
  graphdef, state = nnx.split(model)
  num_prefix = int(getattr(model, "num_prefix_tokens", 0))
  model_grid = getattr(model, "grid_size", None)
  model_grid = None if model_grid is None else tuple(int(g) for g in model_grid)
  try:
    key = (graphdef, num_prefix, model_grid, cfg)
    hash(key)
  except TypeError:  # pragma: no cover - an unhashable graph: no caching
    key = None
  if key is not None and key in _JIT_CACHE:
    run, static_box = _JIT_CACHE[key]
  else:
    static_box: dict = {}

    @jax.jit
    def run(state, images, mask):
      m = nnx.merge(graphdef, state)
      m.eval()
      _, inter = m(images.astype(jnp.float32), return_intermediates=True)
      sums, static = _measures(inter, images, mask, num_prefix=num_prefix, model_grid=model_grid, cfg=cfg)
      static_box[tuple(images.shape)] = static
      return sums

    if key is not None:
      if len(_JIT_CACHE) > 16:
        _JIT_CACHE.clear()
      _JIT_CACHE[key] = (run, static_box)

  def call(images, mask=None):
    images = jnp.asarray(images, jnp.float32)
    mask = jnp.ones(images.shape[:1], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    sums = run(state, images, mask)
    return sums, dict(static_box[tuple(images.shape)])

  return call


def _finite_or_none(x):
  if isinstance(x, (list, tuple)):
    return [_finite_or_none(v) for v in x]
  x = float(x)
  return x if math.isfinite(x) else None


def finalize(sums: Mapping[str, np.ndarray], static: Mapping, cfg: DiagnosticsConfig, *,
             num_prefix: int = 1) -> dict:
  """Divide the accumulated sums by the image count and derive the aggregates (JSON-ready)."""
  count = float(sums["count"])
  if count <= 0:
    raise ValueError("no valid images were measured")
  avg = {k: np.asarray(v, np.float64) / count for k, v in sums.items() if k != "count"}
  depth = static["depth"]
  k = cfg.offset
  mat = avg["attn_similarity"]
  off = np.array([mat[p, p + k] for p in range(max(depth - k, 0))], np.float64)
  similar_ids = [p + k + 1 for p, v in enumerate(off) if np.isfinite(v) and v > cfg.threshold]
  notes = []
  sigs = static["signatures"]
  if any(s is None for s in sigs):
    notes.append("blocks without an attention map: " + str([i + 1 for i, s in enumerate(sigs) if s is None]))
  skipped = [(p + 1, p + k + 1) for p in range(max(depth - k, 0))
             if sigs[p] is not None and sigs[p + k] is not None and sigs[p] != sigs[p + k]]
  if skipped:
    notes.append(f"cross-layer attention similarity skipped (NaN/null) where the maps differ in shape "
                 f"(token counts change: EViT reorganisation or Shunted stages); block pairs {skipped}")
  first = 0 if static.get("has_embed", True) else 1
  if first:
    notes.append("the model exposes no embedding output: token measures start at block 1")
  one_d = [i + first for i, d in enumerate(static["hf_domain"]) if d == "1d"]
  if one_d:
    notes.append(f"no patch grid at token depths {one_d}: hf_energy_share there is the 1-D token-axis DFT "
                 f"share and hf_band_share is null")
  shapes = static["token_shapes"]
  if len({s for s in shapes}) > 1:
    notes.append(f"token shapes vary with depth: {shapes}")
  per_head = avg["attn_similarity_offset_per_head"]
  return {
      "token_depth": list(range(0 if static.get("has_embed", True) else 1, depth + 1)),
      "attn_depth": list(range(1, depth + 1)),
      "num_images": int(count),
      "feature_diversity": _finite_or_none(avg["feature_diversity"].tolist()),
      "feature_diversity_rel": _finite_or_none(avg["feature_diversity_rel"].tolist()),
      "token_similarity": _finite_or_none(avg["token_similarity"].tolist()),
      "hf_energy_share": _finite_or_none(avg["hf_energy_share"].tolist()),
      "hf_domain": list(static["hf_domain"]),
      "hf_band_share": _finite_or_none(avg["hf_band_share"].tolist()),
      "attn_highpass": _finite_or_none(avg["attn_highpass"].tolist()),
      "attn_similarity": _finite_or_none(mat.tolist()),
      "attn_similarity_offset": _finite_or_none(off.tolist()),
      "attn_similarity_offset_per_head": _finite_or_none(per_head.tolist()),
      "attn_similarity_offset_frac_above": _finite_or_none(avg["attn_similarity_offset_frac_above"].tolist()),
      "similar_blocks": len(similar_ids),
      "similar_block_ids": similar_ids,
      "config": dict(dataclasses.asdict(cfg), num_prefix_tokens=num_prefix),
      "notes": notes,
  }


def collect(model: nnx.Module, batches: Iterable, cfg: DiagnosticsConfig = DiagnosticsConfig(), *,
            num_batches: int | None = None, progress: bool = True, desc: str = "diagnostics") -> dict:
  """Per-block measures of `model` averaged over every valid image of `batches`.

  batches: an iterable of dicts with 'image' (B, H, W, C) NHWC and optional 'mask' (B,), or of arrays.
  num_batches: stop after that many batches (also the progress bar's total)."""
  fn = measure_fn(model, cfg)
  totals: dict[str, np.ndarray] | None = None
  static: dict = {}
  try:
    from tqdm.auto import tqdm
    bar = tqdm(total=num_batches, desc=desc, disable=not progress, leave=False)
  except ImportError:  # pragma: no cover
    bar = None
  for i, batch in enumerate(batches):
    if num_batches is not None and i >= num_batches:
      break
    if isinstance(batch, Mapping):
      images, mask = batch["image"], batch.get("mask")
    else:
      images, mask = batch, None
    sums, static = fn(images, mask)
    sums = jax.tree.map(np.asarray, sums)
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  if totals is None:
    raise ValueError("no batches to measure")
  return finalize(totals, static, cfg, num_prefix=int(getattr(model, "num_prefix_tokens", 0)))


# ----------------------------------------------------------------------------------------------- images

def random_batches(image_size, *, batch_size: int = 16, num_batches: int = 2, seed: int = 0,
                   channels: int = 3) -> Iterator[dict]:
  """Gaussian images (already 'normalized'), for tests and when no dataset is at hand."""
  h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  rng = np.random.default_rng(seed)
  for _ in range(num_batches):
    yield {"image": rng.standard_normal((batch_size, h, w, channels)).astype(np.float32),
           "mask": np.ones((batch_size,), np.float32)}


def dataset_batches(image_size: int, *, dataset: str = "demo", batch_size: int = 64,
                    model_name: str | None = None, **data_overrides) -> Iterator[dict]:
  """Eval batches of a dataset through `vit_jax_fix.data.build_eval_iterator` (the embedded demo set by
  default), resized and normalised with the model's preprocessing defaults."""
  from vit_jax_fix import data as vdata
  from vit_jax_fix.models.registry import model_defaults
  cfg = vdata.default_data_config()
  cfg.dataset = dataset
  cfg.image_size = int(image_size)
  for key, value in data_overrides.items():
    setattr(cfg, key, value)
  defaults = model_defaults(model_name) if model_name else None
  return vdata.build_eval_iterator(cfg, global_batch_size=batch_size, process_index=0, process_count=1,
                                   model_defaults=defaults)


def model_image_size(model) -> tuple[int, int]:
  img = getattr(model, "img_size", None)
  if img is None:
    raise ValueError("the model has no img_size attribute: pass images explicitly")
  return (img, img) if isinstance(img, int) else tuple(int(v) for v in img)
