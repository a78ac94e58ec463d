"""Issue #6: a checkpoint trained by the real trainer, exported with the CLI, reloaded in PyTorch, gives the same
top-1 on the demo eval split as the trainer's own JAX eval.

A tiny DeiT (timm has it) trains ~100 steps on the embedded MNIST-5k with `train_and_evaluate` (EMA on, both
raw and EMA evaluated); `python -m vit_jax_fix.convert to-torch` (its `main`, in-process) exports the raw and
the EMA weights to .safetensors in timm's layout; timm builds the model from the file exactly as the file's
metadata says (`pretrained_cfg_overlay=dict(file=...)`), and also through a strict `load_state_dict`; the
PyTorch model then runs over the whole demo eval split, fed the same preprocessed images as the JAX eval
(`build_eval_iterator`, padded last batch masked out, NHWC -> NCHW). Checked: the number of correct examples
equals the trainer's reported top-1 count (metrics.jsonl and the returned dict), per-example predictions equal
the JAX model's, logits agree to 1e-4 (measured: ~5e-6; the smallest top-1/top-2 gap is ~4e-3, so no argmax
tie), and the other weight set's logits are far outside that tolerance (a raw/EMA mix-up fails). The official
layout (.pth) is checked on the same checkpoint with the official-key PyTorch reference module of
benchmarks/torch_reference.py. (A non-timm family, e.g. AugViT, would need a second training, ~30 s more of
XLA compilation on 2 cores; its official layout is covered on golden weights by test_interop_files.py.)

Checked to fail (by patching the export): raw weights written for --ema; k/v rows of one qkv swapped; head bias
+1e-3; one fc1 weight x1.01. Not caught: perturbations whose effect on the logits stays under 1e-4.

Run just these:  python -m pytest tests/test_interop_trained_checkpoint.py -q
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from vit_jax_fix.interop.torch_compat import import_timm

timm = import_timm()
import torch  # noqa: E402

# In-process training with async Orbax saves: on the training worker, never beside another training.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("training")]

# Patch 14 at 28 px (2x2 patches + cls): a 2-block DeiT that learns the digits in ~100 steps on 2 CPU cores.
TINY = dict(img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=2, drop_path_rate=0.0)
STEPS = 100
EVAL_BATCH = 128      # 500 eval examples: the last batch is padded (116 real + 12 masked)
MIN_TOP1 = 0.5        # a trained model; chance is 0.1


def _config(data_dir):
  from configs import deit_s
  c = deit_s.get_config("demo")          # DeiT recipe turned into the demo (configs/common.py: demo)
  c.model.overrides = dict(TINY)
  c.data.data_dir = data_dir
  c.data.image_size = TINY["img_size"]
  c.data.augment = "none"
  c.data.label_smoothing = 0.0
  c.data.shuffle_buffer = 1000
  c.batch_size = 64
  c.eval_batch_size = EVAL_BATCH
  c.total_steps = STEPS
  c.schedule.warmup_steps = 5
  c.optimizer.lr = 3e-3
  c.ema.evaluate = True
  c.ema.decay = 0.9                      # short horizon: the EMA is good too, and differs from the raw weights
  c.eval_every_steps = 0                 # only the final eval
  c.checkpoint_every_steps = STEPS
  c.log_every_steps = 50
  c.progress_bar = False
  return c


@pytest.fixture(scope="module")
def trained(demo_data_dir, tmp_path_factory):
  from vit_jax_fix.train import loop
  from vit_jax_fix.train import sharding as S
  config = _config(str(demo_data_dir))
  workdir = str(tmp_path_factory.mktemp("trained_deit") / "run")
  mesh = S.make_mesh(1, 1, devices=jax.devices()[:1])   # one device: the fastest on 2 cores
  final = loop.train_and_evaluate(config, workdir, mesh=mesh)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [r for r in rows if "eval/top1" in r]
  assert [r["step"] for r in evals] == [STEPS]
  return config, workdir, final, evals[-1]


@pytest.fixture(scope="module")
def eval_split(trained):
  """The whole demo eval split as the trainer's eval sees it: preprocessed NHWC batches, the last one padded and
  masked; and the JAX logits of the checkpoint's raw / EMA weights on them (one jitted forward)."""
  from flax import nnx

  from vit_jax_fix import data as vdata
  from vit_jax_fix import model_defaults
  from vit_jax_fix.train.checkpoint import load_model
  config, workdir, _, _ = trained
  batches = list(vdata.build_eval_iterator(config.data, global_batch_size=EVAL_BATCH,
                                           model_defaults=model_defaults(config.model.name)))
  labels = _valid([b["label"] for b in batches], batches)
  assert len(labels) == 500 and len(batches) == 4 and float(batches[-1]["mask"].min()) == 0.0
  forward = nnx.jit(lambda model, x: model(x))
  jax_logits = {}
  for ema in (False, True):
    model = load_model(workdir, ema=ema)
    jax_logits[ema] = [np.asarray(forward(model, b["image"])) for b in batches]
  return batches, labels, jax_logits


def _torch_logits(torch_model, batches):
  torch_model.eval()
  out = []
  with torch.no_grad():
    for b in batches:
      out.append(torch_model(torch.from_numpy(np.ascontiguousarray(b["image"].transpose(0, 3, 1, 2)))).numpy())
  return out


def _valid(per_batch, batches):
  """Concatenated rows of the real (mask = 1) examples."""
  return np.concatenate([x[b["mask"] > 0] for x, b in zip(per_batch, batches)])


def _reported_correct(final, row, prefix):
  n = int(row[f"{prefix}/count"])
  assert n == 500 and int(final[f"{prefix}/count"]) == n          # every eval example exactly once
  assert final[f"{prefix}/top1"] == pytest.approx(row[f"{prefix}/top1"], abs=1e-12)
  return int(round(row[f"{prefix}/top1"] * n))


def _check_against_trainer(torch_logits, jax_logits, batches, labels, reported, what):
  t, j = _valid(torch_logits, batches), _valid(jax_logits, batches)
  assert t.shape == j.shape == (500, 10)
  t_pred, j_pred = t.argmax(-1), j.argmax(-1)
  top2 = np.sort(j, axis=-1)[:, -2:]
  margin = float(np.min(top2[:, 1] - top2[:, 0]))   # smallest top-1 / top-2 gap (a tie would show here)
  print(f"{what}: {int(np.sum(t_pred == labels))}/500 correct in PyTorch, {reported}/500 reported by the trainer, "
        f"max |logit difference| {np.abs(t - j).max():.1e}, smallest JAX top-1/top-2 gap {margin:.1e}")
  assert int(np.sum(j_pred == labels)) == reported, f"{what}: JAX reload disagrees with the trainer's eval"
  assert int(np.sum(t_pred == labels)) == reported, \
      f"{what}: PyTorch top-1 {np.mean(t_pred == labels):.4f} vs JAX eval {reported / 500:.4f} (gap {margin:.1e})"
  np.testing.assert_array_equal(t_pred, j_pred, err_msg=f"{what}: per-example predictions differ")
  np.testing.assert_allclose(t, j, atol=1e-4, rtol=1e-4, err_msg=f"{what}: logits differ")


@pytest.mark.parametrize("ema", [False, True], ids=["raw", "ema"])
def test_trained_checkpoint_same_top1_in_timm(trained, eval_split, tmp_path, ema):
  from safetensors.torch import load_file

  from vit_jax_fix import convert
  from vit_jax_fix.interop import read_state_dict
  config, workdir, final, row = trained
  prefix = "eval_ema" if ema else "eval"
  reported = _reported_correct(final, row, prefix)
  assert reported / 500 > MIN_TOP1, f"the demo model did not train: {prefix} top-1 {reported / 500:.3f}"

  # 1. Export exactly as a user does: python -m vit_jax_fix.convert to-torch --checkpoint WORKDIR --out F [--ema]
  path = str(tmp_path / "model.safetensors")
  assert convert.main(["to-torch", "--checkpoint", workdir, "--out", path] + (["--ema"] if ema else [])) == 0
  _, info = read_state_dict(path)
  meta = info["metadata"]
  assert meta["layout"] == "timm" and meta["weights"] == ("ema" if ema else "raw")
  assert meta["timm_model"] == "deit_small_patch16_224" and meta["num_classes"] == 10
  assert meta["timm_kwargs"]["img_size"] == 28 and meta["timm_kwargs"]["patch_size"] == 14

  # 2. timm builds and loads it from the file's metadata alone (timm's pretrained loader, strict) ...
  via_timm = timm.create_model(meta["timm_model"], pretrained=True,
                               pretrained_cfg_overlay=dict(file=path, num_classes=meta["num_classes"]),
                               **meta["timm_kwargs"])
  # ... and a plain timm model takes the same tensors with load_state_dict(strict=True).
  plain = timm.create_model(meta["timm_model"], pretrained=False, **meta["timm_kwargs"])
  plain.load_state_dict(load_file(path), strict=True)
  for (k1, v1), (k2, v2) in zip(via_timm.state_dict().items(), plain.state_dict().items()):
    assert k1 == k2 and torch.equal(v1, v2), k1

  # 3. The whole demo eval split, the images the JAX eval sees.
  batches, labels, jax_logits = eval_split
  torch_logits = _torch_logits(via_timm, batches)
  _check_against_trainer(torch_logits, jax_logits[ema], batches, labels, reported, f"timm ({prefix})")
  # The check can tell the two weight sets apart: the other one's logits are far outside the tolerance.
  other = np.abs(_valid(torch_logits, batches) - _valid(jax_logits[not ema], batches)).max()
  assert other > 1e-3, f"raw and EMA logits differ by only {other:.1e}: the test could not catch a swap"


def test_trained_checkpoint_official_layout(trained, eval_split, tmp_path):
  """The same checkpoint in the official layout (.pth) into the official-key PyTorch reference module."""
  from benchmarks.torch_reference import reference_for

  from vit_jax_fix import convert
  config, workdir, final, row = trained
  reported = _reported_correct(final, row, "eval")
  path = str(tmp_path / "model_official.pth")
  assert convert.main(["to-torch", "--checkpoint", workdir, "--out", path, "--layout", "official"]) == 0
  blob = torch.load(path, map_location="cpu", weights_only=True)
  assert blob["metadata"]["layout"] == "official" and blob["metadata"]["weights"] == "raw"
  ref = reference_for(config.model.name, **blob["metadata"]["model_kwargs"])
  ref.load_state_dict(blob["state_dict"], strict=True)
  batches, labels, jax_logits = eval_split
  _check_against_trainer(_torch_logits(ref, batches), jax_logits[False], batches, labels, reported,
                         "official reference (eval)")
