"""Closed-form linear probes on frozen features, per block: how linearly decodable the classes are at each
depth (the behaviour of big_vision's ``fewshot_lsr`` evaluator, extended to every block and several l2).

**Ridge regression, one eigendecomposition for every l2.** Train features X (N, D) are whitened with their
own per-dimension mean and standard deviation (std + 1e-5), and a constant column b = 100 is appended: the
bias weight w_b enters the fit as b * w_b but the penalty as l2 * w_b^2, so the bias is regularised by only
l2 / b^2. Targets are one-hot in {-1, +1} (Y, N x C). The ridge solution

    W(l2) = argmin ||X W - Y||^2 + l2 ||W||^2 = (X^T X + l2 I)^-1 X^T Y = X^T (X X^T + l2 I)^-1 Y

is computed from one symmetric eigendecomposition: X^T X = Q diag(e) Q^T when N >= D+1, giving
W = Q diag(1 / (e + l2)) Q^T X^T Y; else X X^T = Q diag(e) Q^T and W = X^T Q diag(1 / (e + l2)) Q^T Y. Each
further l2 costs two matrix products. Prediction: argmax over classes of X_test W (test features whitened
with the train statistics). Everything runs in float64 NumPy on the host: the matrices are small
(D up to a few thousand), and the eigendecomposition is exact enough for l2 down to 1e-6 x trace.

**Choosing l2 (`linear_probe`).** A seeded `holdout` fraction of the train features is set aside; each l2 of
`l2_regs` is fitted on the rest and scored on it; the best (the largest l2 among ties) is refitted on all
train features and scored on the test features. The result also lists every l2's held-out and test
accuracy, so a reader can see how flat the choice was.

**Few-shot (`few_shot`)**, as big_vision: for each seed, `shots` train examples per class are drawn
(a permutation of each class's examples, the first `shots`), fitted at one l2, scored on all test features.

**Per block (`block_features`, `probe_depths`).** One jitted pass per batch runs the model with
``return_intermediates=True`` in eval mode and pools each block's tokens: 'cls' the first token (ViT-family
models with prefix tokens; CaiT's class-attention blocks, which only update the class token, appear as extra
depths L + 1 .. L + J of this pool), 'gap' the mean of the patch tokens (prefix tokens excluded; after an EViT
reorganisation the kept tokens and the fused token). Depth 0 is the embedding (the tokens entering block 1;
absent for Shunted, whose depths start at 1). 'pre_logits' is the head's input (after the final norm), the
classic linear probe of the whole backbone.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BIAS = 100.0
L2_REGS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
POOLS = ("cls", "gap")


class RidgeProbe:
  """The ridge solutions W(l2) of whitened train features for any l2 (module docstring)."""

  def __init__(self, x, y, num_classes: int):
    x = np.asarray(x, np.float64)
    self.num_classes = int(num_classes)
    self.mean = x.mean(axis=0, keepdims=True)
    self.std = x.std(axis=0, keepdims=True) + 1e-5
    x = self._design(x)
    t = 2.0 * np.eye(self.num_classes)[np.asarray(y, np.int64)] - 1.0
    n, d = x.shape
    if n >= d:
      self.eigs, q = np.linalg.eigh(x.T @ x)
      self.left, self.right = q, q.T @ (x.T @ t)
    else:
      self.eigs, q = np.linalg.eigh(x @ x.T)
      self.left, self.right = x.T @ q, q.T @ t

  def _design(self, x):
    x = (np.asarray(x, np.float64) - self.mean) / self.std
    return np.concatenate([x, np.full((x.shape[0], 1), BIAS)], axis=1)

  def weights(self, l2: float) -> np.ndarray:
    """W(l2), (D + 1, C): the last row is the bias weight."""
    return (self.left / (self.eigs + float(l2))[None, :]) @ self.right

  def predict(self, x, l2: float) -> np.ndarray:
    return np.argmax(self._design(x) @ self.weights(l2), axis=1)

  def accuracy(self, x, y, l2: float) -> float:
    return float(np.mean(self.predict(x, l2) == np.asarray(y)))


def linear_probe(x_train, y_train, x_test, y_test, num_classes: int, *, l2_regs: Sequence[float] = L2_REGS,
                 holdout: float = 0.2, seed: int = 0) -> dict:
  """Test accuracy at the l2 chosen on a held-out part of the train features, and every l2's scores."""
  x_train, y_train = np.asarray(x_train), np.asarray(y_train)
  n = len(y_train)
  n_hold = int(round(holdout * n))
  if not 0 < n_hold < n:
    raise ValueError(f"holdout={holdout} of {n} train examples leaves no held-out or no fitting examples")
  order = np.random.default_rng(seed).permutation(n)
  fit, hold = order[n_hold:], order[:n_hold]
  part = RidgeProbe(x_train[fit], y_train[fit], num_classes)
  held = [part.accuracy(x_train[hold], y_train[hold], l2) for l2 in l2_regs]
  full = RidgeProbe(x_train, y_train, num_classes)
  test = [full.accuracy(x_test, y_test, l2) for l2 in l2_regs]
  best = max(range(len(l2_regs)), key=lambda i: (held[i], l2_regs[i]))
  return {"accuracy": test[best], "l2": float(l2_regs[best]), "l2_regs": [float(v) for v in l2_regs],
          "holdout_accuracy": held, "test_accuracy": test}


def few_shot(x_train, y_train, x_test, y_test, num_classes: int, *, shots: Sequence[int] = (1, 5, 10),
             l2: float = 1.0, seeds: int = 3) -> dict:
  """{shots: {'accuracy': mean over seeds, 'per_seed': [...]}}: `shots` train examples per class."""
  x_train, y_train = np.asarray(x_train), np.asarray(y_train)
  out = {}
  for k in shots:
    accs = []
    for seed in range(seeds):
      rng = np.random.default_rng(seed)
      idx = np.concatenate([rng.permutation(np.flatnonzero(y_train == c))[:k] for c in range(num_classes)])
      accs.append(RidgeProbe(x_train[idx], y_train[idx], num_classes).accuracy(x_test, y_test, l2))
    out[int(k)] = {"accuracy": float(np.mean(accs)), "per_seed": accs}
  return out


# --------------------------------------------------------------------------------- features per block

def _pooled(inter: Mapping, num_prefix: int) -> dict:
  """{pool: [(B, D) per depth]} from a model's intermediates (traced)."""
  tokens = ([inter["embed"]] if inter.get("embed") is not None else []) + list(inter["tokens"])
  out = {"gap": [jnp.mean(z[:, num_prefix:].astype(jnp.float32), axis=1) for z in tokens]}
  if num_prefix:
    out["cls"] = [z[:, 0].astype(jnp.float32) for z in tokens]
  if inter.get("cls_tokens"):       # CaiT: the class token through the class-attention blocks
    out["cls"] = [z[:, 0].astype(jnp.float32) for z in inter["cls_tokens"]]
  out["pre_logits"] = inter["pre_logits"].astype(jnp.float32)
  return out


_JIT_CACHE: dict = {}


def _features_fn(graphdef, num_prefix: int):
  """One jitted features function per model structure: the train and test passes (and later calls on the
  same model, e.g. after training) compile once per batch shape."""
  key = (graphdef, num_prefix)
  if key not in _JIT_CACHE:
    static: dict = {}

    @jax.jit
    def run(state, images):
      m = nnx.merge(graphdef, state)
      m.eval()
      _, inter = m(images.astype(jnp.float32), return_intermediates=True)
      static["first"] = 0 if inter.get("embed") is not None else 1
      static["class_attention"] = bool(inter.get("cls_tokens"))
      return _pooled(inter, num_prefix)
    if len(_JIT_CACHE) > 8:
      _JIT_CACHE.clear()
    _JIT_CACHE[key] = (run, static)
  return _JIT_CACHE[key]


def block_features(model: nnx.Module, batches: Iterable, *, max_examples: int | None = None) -> dict:
  """Pooled features of every block for the valid images of `batches` (dicts with 'image', 'label' and an
  optional 'mask'): {'labels': (N,), 'gap': [(N, D_i)], 'cls': [...] (when the model has a class token),
  'pre_logits': (N, D), 'depth': {pool: [depth of each entry]}}."""
  graphdef, state = nnx.split(model)
  run, static = _features_fn(graphdef, int(getattr(model, "num_prefix_tokens", 0)))

  parts, labels, count = [], [], 0
  for batch in batches:
    images = np.asarray(batch["image"], np.float32)
    keep = np.asarray(batch.get("mask", np.ones(len(images))), np.float32) > 0
    out = jax.device_get(run(state, images))
    parts.append(jax.tree.map(lambda a: np.asarray(a)[keep], out))
    labels.append(np.asarray(batch["label"])[keep])
    count += int(keep.sum())
    if max_examples is not None and count >= max_examples:
      break
  if not parts:
    raise ValueError("no batches to compute features from")
  res = {k: jax.tree.map(lambda *xs: np.concatenate(xs)[:max_examples], *[p[k] for p in parts])
         for k in parts[0]}
  res["labels"] = np.concatenate(labels)[:max_examples]
  first = static["first"]
  res["depth"] = {"gap": list(range(first, first + len(res["gap"])))}
  if "cls" in res:   # CaiT's class-attention depths follow the self-attention blocks
    start = first + len(res["gap"]) if static["class_attention"] else first
    res["depth"]["cls"] = list(range(start, start + len(res["cls"])))
  return res


def probe_depths(model: nnx.Module, train_batches: Iterable, test_batches: Iterable, *,
                 num_classes: int | None = None, l2_regs: Sequence[float] = L2_REGS, holdout: float = 0.2,
                 max_train: int | None = None, max_test: int | None = None, shots: Sequence[int] = (),
                 seed: int = 0) -> dict:
  """Linear-probe test accuracy per depth and pool (and optionally few-shot accuracy per depth), JSON-ready:
  {'depth': {pool: [...]}, 'accuracy': {pool: [...]}, 'l2': {pool: [...]}, 'pre_logits': linear_probe(...),
   'few_shot': {pool: {shots: [accuracy per depth]}}, 'num_train', 'num_test', 'num_classes', ...}."""
  tr = block_features(model, train_batches, max_examples=max_train)
  te = block_features(model, test_batches, max_examples=max_test)
  if num_classes is None:
    num_classes = int(max(tr["labels"].max(), te["labels"].max())) + 1
  out = {"num_train": int(len(tr["labels"])), "num_test": int(len(te["labels"])), "num_classes": num_classes,
         "l2_regs": [float(v) for v in l2_regs], "holdout": holdout, "depth": {}, "accuracy": {}, "l2": {},
         "few_shot": {}}
  for pool in POOLS:
    if pool not in tr:
      continue
    res = [linear_probe(a, tr["labels"], b, te["labels"], num_classes, l2_regs=l2_regs, holdout=holdout,
                        seed=seed) for a, b in zip(tr[pool], te[pool])]
    out["depth"][pool] = tr["depth"][pool]
    out["accuracy"][pool] = [r["accuracy"] for r in res]
    out["l2"][pool] = [r["l2"] for r in res]
    if shots:
      fs = [few_shot(a, tr["labels"], b, te["labels"], num_classes, shots=shots) for a, b in zip(tr[pool], te[pool])]
      out["few_shot"][pool] = {str(k): [f[k]["accuracy"] for f in fs] for k in shots}
  out["pre_logits"] = linear_probe(tr["pre_logits"], tr["labels"], te["pre_logits"], te["labels"], num_classes,
                                   l2_regs=l2_regs, holdout=holdout, seed=seed)
  out["chance"] = float(np.max(np.bincount(te["labels"], minlength=num_classes)) / len(te["labels"]))
  return out


def dataset_probe(model: nnx.Module, data: str = "demo", *, model_name: str | None = None, batch_size: int = 64,
                  max_train: int = 2000, max_test: int = 1000, **kwargs) -> dict:
  """`probe_depths` on a labelled dataset through `vit_jax_fix.data` ('demo' or a tfds name): the first
  `max_train` images of its train split (eval transform: no augmentation) and the first `max_test` of its
  eval split, resized and normalised as the model expects."""
  from vit_jax_fix.diagnostics.collect import dataset_batches, model_image_size
  if data == "random":
    raise ValueError("a linear probe needs labelled images: use --data demo or a tfds dataset name")
  size = model_image_size(model)
  if size[0] != size[1]:
    raise ValueError(f"dataset images are square; the model expects {size}")
  name = model_name or getattr(model, "spec_name", None)
  train = dataset_batches(size[0], dataset=data, batch_size=batch_size, model_name=name, eval_split="train")
  test = dataset_batches(size[0], dataset=data, batch_size=batch_size, model_name=name)
  res = probe_depths(model, train, test, max_train=max_train, max_test=max_test, **kwargs)
  res["data"] = data
  return res
