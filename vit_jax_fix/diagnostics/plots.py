"""Plots of the collapse measures (matplotlib Figure objects: no display and no global backend needed).

`plot_measures_vs_depth(results, path)`: one panel per measure, measure vs depth, one line per model.
`plot_attention_similarity(results, path)`: one heat map of the (L, L) cross-layer attention similarity per
model (blank where the maps differ in shape).
`plot_hf_bands(results, path)`: energy share per 2-D DFT band vs depth, one panel per model.
`plot_all(results, out_dir, suffix)` writes the three and returns their paths.
`plot_probe_vs_depth(probes, path)`: linear-probe test accuracy vs depth (`probe.probe_depths` results), one
colour per model, solid for the class token, dashed for the mean patch token, a dotted line at the pre-logits
probe and a grey one at chance.

`results` maps a label (model / checkpoint) to the dict `collect` returns.
"""
from __future__ import annotations

import math
from typing import Mapping

from etils import epath
from matplotlib.figure import Figure
import numpy as np  # noqa: E402

from vit_jax_fix import paths

PANELS = (
    ("feature_diversity_rel", "token_depth", "feature diversity ||Z-1z^T||_F / ||Z||_F"),
    ("feature_diversity", "token_depth", "feature diversity ||Z-1z^T||_F (raw)"),
    ("token_similarity", "token_depth", "token similarity (mean pairwise cos, patches)"),
    ("hf_energy_share", "token_depth", "high-frequency energy share (1 - DC)"),
    ("attn_highpass", "attn_depth", "attention high-pass ||A-1/N||_F / ||A||_F"),
    ("attn_similarity_offset", None, "cross-layer attn similarity M[p, p+k]"),
)


def _arr(values):
  return np.array([np.nan if v is None else v for v in values], np.float64)


def _safe(label: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def plot_measures_vs_depth(results: Mapping[str, dict], path, *, title: str = "") -> epath.Path:
  fig = Figure(figsize=(15, 8))
  axes = fig.subplots(2, 3)
  for ax, (key, depth_key, label) in zip(axes.ravel(), PANELS):
    for name, res in results.items():
      y = _arr(res[key])
      if depth_key is None:   # M[p, p+k] is drawn at the later block p + k
        k = res["config"]["offset"]
        x = np.arange(len(y)) + 1 + k
      else:
        x = np.asarray(res[depth_key])
      ax.plot(x, y, marker=".", label=name)
    if key == "attn_similarity_offset":
      thr = next(iter(results.values()))["config"]["threshold"] if results else 0.9
      ax.axhline(thr, color="gray", ls="--", lw=0.8)
    ax.set_title(label, fontsize=9)
    ax.set_xlabel("block (0 = embedding)" if depth_key == "token_depth" else "block")
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  cfg = next(iter(results.values()))["config"] if results else {}
  fig.suptitle(f"{title}  [norm: {cfg.get('norm')}, cls in diversity: {cfg.get('diversity_include_prefix')}, "
               f"similarity offset k={cfg.get('offset')}, threshold {cfg.get('threshold')}]".strip(), fontsize=10)
  return _save(fig, path)


def _panel_grid(n: int, *, panel_height: float):
  """A figure with one panel per model, at most 3 per row; unused panels hidden."""
  n = max(n, 1)
  cols = min(n, 3)
  rows = math.ceil(n / cols)
  fig = Figure(figsize=(4.6 * cols, panel_height * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.ravel()[n:]:
    ax.axis("off")
  return fig, axes


def _save(fig, path) -> epath.Path:
  """The figure at `path` (format from the suffix), local or in a bucket: matplotlib writes into the file."""
  fig.tight_layout()
  path = paths.as_path(path)
  with path.open("wb") as f:
    fig.savefig(f, format=path.suffix[1:] or "png", dpi=110)
  return path


def plot_attention_similarity(results: Mapping[str, dict], path, *, title: str = "") -> epath.Path:
  fig, axes = _panel_grid(len(results), panel_height=4.2)
  for ax, (name, res) in zip(axes.ravel(), results.items()):
    mat = np.array([_arr(row) for row in res["attn_similarity"]]) if res["attn_similarity"] else np.zeros((0, 0))
    if mat.size:
      im = ax.imshow(mat, vmin=0.0, vmax=1.0, cmap="viridis", origin="lower",
                     extent=(0.5, mat.shape[1] + 0.5, 0.5, mat.shape[0] + 0.5))
      fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(f"{name}: #similar blocks {res['similar_blocks']}", fontsize=9)
    ax.set_xlabel("block q")
    ax.set_ylabel("block p")
  fig.suptitle(f"{title} cross-layer attention similarity (mean column cosine)".strip(), fontsize=10)
  return _save(fig, path)


def plot_hf_bands(results: Mapping[str, dict], path, *, title: str = "") -> epath.Path:
  fig, axes = _panel_grid(len(results), panel_height=3.6)
  for ax, (name, res) in zip(axes.ravel(), results.items()):
    bands = np.array([_arr(b) for b in res["hf_band_share"]])
    x = np.asarray(res["token_depth"])
    for j in range(bands.shape[1]):
      ax.plot(x, bands[:, j], label="DC" if j == 0 else f"band {j}")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("block (0 = embedding)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  fig.suptitle(f"{title} energy share by radial band of the 2-D DFT over the patch grid".strip(), fontsize=10)
  return _save(fig, path)


def plot_all(results: Mapping[str, dict], out_dir, *, suffix: str = "", title: str = "") -> dict:
  out = paths.as_path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  return {
      "measures_vs_depth": plot_measures_vs_depth(results, out / f"measures_vs_depth{suffix}.png", title=title),
      "attn_similarity": plot_attention_similarity(results, out / f"attn_similarity{suffix}.png", title=title),
      "hf_bands": plot_hf_bands(results, out / f"hf_bands{suffix}.png", title=title),
  }


def plot_probe_vs_depth(probes: Mapping[str, dict], path, *, title: str = ""):
  """Linear-probe accuracy against depth, for {label: `diagnostics.probe.probe_depths(...)` result}."""
  fig = Figure(figsize=(7, 4.2))
  ax = fig.subplots()
  styles = {"cls": ("-", "o", "class token"), "gap": ("--", ".", "mean patch token")}
  for i, (name, res) in enumerate(probes.items()):
    color = f"C{i}"
    for pool, acc in res["accuracy"].items():
      ls, marker, what = styles[pool]
      ax.plot(res["depth"][pool], acc, ls=ls, marker=marker, color=color, label=f"{name}: {what}")
    ax.axhline(res["pre_logits"]["accuracy"], color=color, ls=":", lw=1,
               label=f"{name}: pre-logits {res['pre_logits']['accuracy']:.3f}")
  if probes:
    ax.axhline(next(iter(probes.values()))["chance"], color="gray", lw=0.8, label="chance (majority class)")
  ax.set_xlabel("block (0 = embedding)")
  ax.set_ylabel("linear-probe test accuracy")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  first = next(iter(probes.values()), {})
  fig.suptitle(f"{title} closed-form ridge probe per block ({first.get('num_train')} train / "
               f"{first.get('num_test')} test images, l2 chosen on a held-out part)".strip(), fontsize=9)
  return _save(fig, path)
