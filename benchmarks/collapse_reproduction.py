"""Collapse reproduction on the embedded demo dataset (MNIST-5k): a deep plain ViT vs the same depth with
each fix, at init and after a short training, measured with `vit_jax_fix.diagnostics`.

    python benchmarks/collapse_reproduction.py --out /tmp/collapse            # ~20 min on 2 shared CPU cores
    python benchmarks/collapse_reproduction.py --out /tmp/c --steps 20 --depth 6   # smoke run

Models: `create_model('deit_tiny_patch16_224', img_size=28, patch_size=4, embed_dim=48, depth=24,
num_heads=3, mlp_ratio=2, num_classes=10, **fix)` with fix in
  plain        {}
  augshortcut  aug_shortcut='circulant2'   (AugViT-S's official mode)
  featscale    feat_scale='double'         (official ViT FeatScale)
  attnscale    attn_scale=True
  reattention  reattention=True            (DeepViT, every block)
All start from the same seed (shared parameters are identical at init). Blocks run under `scan_blocks=True`
(same function, one compiled block body: a 24-block model compiles in seconds instead of many minutes).

Training: the trainer (vit_jax_fix.train) was not available when this was written, so this script trains with
optax directly: AdamW (lr 1e-3, wd 0.05, 10% linear warm-up then cosine, clip 1.0), batch 32, 100 steps, no augmentation,
no mixup, cross-entropy, on the 4,500 demo train images resized to 28 px (crop_pct 1.0) and normalised with ImageNet
mean/std. Diagnostics use the 500 demo test images (``--eval-images``), model in eval mode.

Outputs under --out: `collapse_results.json` (every measure per model and phase, plus train loss and test
accuracy), `measures_vs_depth_init.png`, `measures_vs_depth_trained.png`, `attn_similarity_init.png`,
`attn_similarity_trained.png`, `hf_bands_*.png`. The JSON is rewritten after each model so a partial run
leaves usable results. To use more cores, run one process per variant and merge:

    for v in plain augshortcut featscale attnscale reattention; do
      python benchmarks/collapse_reproduction.py --out /tmp/c/$v --variants $v & done; wait
    python benchmarks/collapse_reproduction.py --out /tmp/c/all --merge /tmp/c/{plain,augshortcut,featscale,attnscale,reattention}
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from vit_jax_fix import create_model  # noqa: E402
from vit_jax_fix import diagnostics  # noqa: E402

VARIANTS = {
    "plain": {},
    "augshortcut": {"aug_shortcut": "circulant2"},
    "featscale": {"feat_scale": "double"},
    "attnscale": {"attn_scale": True},
    "reattention": {"reattention": True},
}


def load_split(split: str, image_size: int, limit: int | None = None):
  """All images of a demo split as numpy (N, H, W, 3) normalised, and labels."""
  batches = diagnostics.dataset_batches(image_size, dataset="demo", batch_size=100,
                                        model_name="deit_tiny_patch16_224", eval_split=split,
                                        crop_pct=1.0)
  xs, ys = [], []
  for b in batches:
    keep = b["mask"] > 0
    xs.append(b["image"][keep])
    ys.append(b["label"][keep])
  x, y = np.concatenate(xs), np.concatenate(ys).astype(np.int32)
  return (x[:limit], y[:limit]) if limit else (x, y)


def build(args, fix: dict):
  return create_model("deit_tiny_patch16_224", img_size=args.img_size, patch_size=args.patch_size,
                      embed_dim=args.dim, depth=args.depth, num_heads=args.heads, mlp_ratio=args.mlp_ratio,
                      num_classes=10, seed=args.seed, scan_blocks=True, **fix)


def train(model, x, y, args):
  sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10), max(args.steps, 2))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.05))
  model.train()
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, images, labels):
    def loss_fn(m):
      logits = m(images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  rng = np.random.default_rng(args.seed)
  losses = []
  t0 = time.time()
  for i in range(args.steps):
    idx = rng.integers(0, len(x), args.batch_size)
    losses.append(float(step(model, opt, jnp.asarray(x[idx]), jnp.asarray(y[idx]))))
    if (i + 1) % max(1, args.steps // 10) == 0:
      print(f"    step {i + 1}/{args.steps} loss {np.mean(losses[-10:]):.4f} ({time.time() - t0:.0f}s)", flush=True)
  model.eval()
  return losses, time.time() - t0


@nnx.jit
def _predict(model, images):
  return jnp.argmax(model(images), -1)


def accuracy(model, x, y, batch=100):
  model.eval()
  correct = 0
  for i in range(0, len(x), batch):
    correct += int(np.sum(np.asarray(_predict(model, jnp.asarray(x[i:i + batch]))) == y[i:i + batch]))
  return correct / len(x)


def measure(model, x, args, label):
  batches = ({"image": x[i:i + args.eval_batch]} for i in range(0, len(x), args.eval_batch))
  n = (len(x) + args.eval_batch - 1) // args.eval_batch
  return diagnostics.collect(model, batches, diagnostics.DiagnosticsConfig(), num_batches=n, desc=label)


def plot(results, out):
  depth = results["setup"]["depth"]
  for phase in ("init", "trained"):
    if results[phase]:
      diagnostics.plot_all(results[phase], out, suffix=f"_{phase}", title=f"{depth}-block ViT, {phase}")


def merge(dirs, out):
  merged = None
  for d in dirs:
    r = json.loads((pathlib.Path(d) / "collapse_results.json").read_text())
    if merged is None:
      merged = r
      continue
    merged["setup"]["fixes"].update(r["setup"]["fixes"])
    merged["setup"]["variants"] += r["setup"]["variants"]
    for phase in ("init", "trained", "train"):
      merged[phase].update(r[phase])
  (out / "collapse_results.json").write_text(json.dumps(merged, indent=1))
  plot(merged, out)
  return merged


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  p.add_argument("--depth", type=int, default=24)
  p.add_argument("--dim", type=int, default=48)
  p.add_argument("--heads", type=int, default=3)
  p.add_argument("--mlp-ratio", type=float, default=2.0)
  p.add_argument("--img-size", type=int, default=28)
  p.add_argument("--patch-size", type=int, default=4)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--eval-images", type=int, default=256)
  p.add_argument("--eval-batch", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                 help="only merge the collapse_results.json of these run dirs (e.g. one per variant, run in "
                      "parallel) into --out and plot")
  args = p.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.merge:
    return merge(args.merge, out)

  print("loading the demo dataset", flush=True)
  x_train, y_train = load_split("train", args.img_size)
  x_test, y_test = load_split("test", args.img_size)
  x_diag = x_test[:args.eval_images]
  results = {"setup": {k: v for k, v in vars(args).items() if k != "out"}, "device": str(jax.devices()[0]),
             "init": {}, "trained": {}, "train": {}}
  results["setup"]["fixes"] = {v: VARIANTS[v] for v in args.variants}
  for name in args.variants:
    print(f"[{name}]", flush=True)
    model = build(args, VARIANTS[name])
    model.eval()  # same graph (eval mode) at init and after training: the diagnostics compile once
    results["init"][name] = measure(model, x_diag, args, f"{name} init")
    acc0 = accuracy(model, x_test, y_test)
    losses, secs = train(model, x_train, y_train, args)
    results["trained"][name] = measure(model, x_diag, args, f"{name} trained")
    acc = accuracy(model, x_test, y_test)
    results["train"][name] = {"test_acc_init": acc0, "test_acc": acc, "final_loss": float(np.mean(losses[-10:])),
                              "first_loss": float(np.mean(losses[:10])), "train_seconds": secs}
    print(f"    test acc {acc0:.3f} -> {acc:.3f}", flush=True)
    (out / "collapse_results.json").write_text(json.dumps(results, indent=1))
    plot(results, out)
  print(f"wrote {out}", flush=True)
  return results


if __name__ == "__main__":
  main()
