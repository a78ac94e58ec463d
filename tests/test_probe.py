"""Closed-form linear probes (diagnostics/probe.py): the eigendecomposition solution equals the direct ridge
solve in both regimes (N >= D and N < D), the held-out l2 choice, few-shot sampling, per-block depth
bookkeeping (CaiT's class-attention depths) and `diagnose --probe` writing JSON and the plot."""
import json

import numpy as np
import pytest

from vit_jax_fix.diagnostics import probe
from vit_jax_fix.models.registry import create_model


def _direct(x, y, c, l2):
  """(X^T X + l2 I)^-1 X^T Y on the whitened, bias-augmented features, solved directly."""
  x = (x - x.mean(0)) / (x.std(0) + 1e-5)
  x = np.concatenate([x, np.full((len(x), 1), probe.BIAS)], axis=1)
  t = 2.0 * np.eye(c)[y] - 1.0
  return np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ t)


@pytest.mark.parametrize("n,d", [(60, 8), (12, 30)])
def test_ridge_weights_equal_the_direct_solve(n, d):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(n, d)), rng.integers(0, 3, n)
  p = probe.RidgeProbe(x, y, 3)
  for l2 in (1e-2, 1.0, 1e3):
    np.testing.assert_allclose(p.weights(l2), _direct(x, y, 3, l2), rtol=1e-6, atol=1e-9)


def test_linear_probe_separable_noise_and_l2_choice():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 4, 400)
  means = rng.normal(size=(4, 16)) * 3
  x = means[y] + rng.normal(size=(400, 16))
  res = probe.linear_probe(x[:300], y[:300], x[300:], y[300:], 4)
  assert res["accuracy"] > 0.95
  top = max(res["holdout_accuracy"])      # the largest l2 among the best held-out scores, refitted
  assert res["l2"] == max(l2 for l2, h in zip(res["l2_regs"], res["holdout_accuracy"]) if h == top)
  assert res["accuracy"] == res["test_accuracy"][res["l2_regs"].index(res["l2"])]
  noise = probe.linear_probe(rng.normal(size=(300, 16)), y[:300], rng.normal(size=(100, 16)), y[300:], 4)
  assert noise["accuracy"] < 0.45
  fs = probe.few_shot(x[:300], y[:300], x[300:], y[300:], 4, shots=(1, 5), seeds=2)
  assert set(fs) == {1, 5} and len(fs[5]["per_seed"]) == 2 and fs[5]["accuracy"] > 0.8


def test_cait_depths_and_pools():
  """CaiT has no prefix token in its self-attention blocks: 'gap' covers depths 0..L, 'cls' the
  class-attention blocks L+1 .. L+J."""
  model = create_model("cait_XXS24_224", img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                       class_attn_depth=2, num_classes=3)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(12, 16, 16, 3)).astype(np.float32), "label": np.arange(12) % 3,
              "mask": np.r_[np.ones(10), np.zeros(2)]} for _ in range(2)]
  res = probe.probe_depths(model, batches, batches, holdout=0.25)
  assert res["depth"] == {"gap": [0, 1, 2], "cls": [3, 4]}
  assert res["num_train"] == 20 and res["num_classes"] == 3
  assert all(0.0 <= a <= 1.0 for v in res["accuracy"].values() for a in v)


def test_diagnose_probe_writes_json_and_plot(tmp_path, monkeypatch, demo_data_dir):
  from vit_jax_fix import diagnose
  monkeypatch.setenv("VIT_JAX_FIX_DATA_DIR", str(demo_data_dir))
  out = tmp_path / "diag"
  diagnose.main(["--model", "deit_tiny_patch16_224:img_size=28,patch_size=7,embed_dim=32,depth=2,num_heads=2",
                 "--label", "tiny", "--out", str(out), "--num-batches", "1", "--batch-size", "50", "--probe",
                 "--probe-train", "300", "--probe-test", "100", "--probe-shots", "5", "--no-progress"])
  res = json.loads((out / "probe.json").read_text())["tiny"]
  assert res["num_train"] == 300 and res["num_test"] == 100 and res["num_classes"] == 10
  assert res["depth"]["cls"] == res["depth"]["gap"] == [0, 1, 2]
  assert res["accuracy"]["cls"][0] <= res["chance"]    # the class token before block 1: one constant feature
  assert max(res["accuracy"]["gap"]) > res["chance"] + 0.1                      # random features, MNIST digits
  assert res["accuracy"]["cls"][2] > res["accuracy"]["cls"][0] + 0.1
  assert len(res["few_shot"]["gap"]["5"]) == 3
  assert (out / "probe_vs_depth.png").read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(SystemExit):
    diagnose.main(["--model", "deit_tiny_patch16_224:img_size=28,patch_size=7,embed_dim=32,depth=2,num_heads=2",
                   "--data", "random", "--num-batches", "1", "--batch-size", "4", "--out", str(out), "--probe",
                   "--no-progress"])
