"""Collapse diagnostics: known-answer tests of the measures, the jitted collection, logging and the CLI."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax_fix import create_model
from vit_jax_fix import diagnostics as D
from vit_jax_fix.diagnostics import measures as M

TINY = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2, num_classes=10)


def _rng(seed=0):
  return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------- feature diversity

def test_rank1_tokens_have_zero_diversity():
  z = jnp.asarray(np.tile(_rng().standard_normal((2, 1, 16)), (1, 9, 1)), jnp.float32)   # identical rows
  raw, rel = M.feature_diversity(z)
  np.testing.assert_allclose(raw, 0.0, atol=1e-5)
  np.testing.assert_allclose(rel, 0.0, atol=1e-6)


def test_diversity_matches_frobenius_distance_and_mean_is_the_minimiser():
  z = _rng(1).standard_normal((1, 7, 5)).astype(np.float32)
  raw, rel = M.feature_diversity(jnp.asarray(z))
  mean = z.mean(1, keepdims=True)
  expect = np.linalg.norm(z - mean)
  np.testing.assert_allclose(raw[0], expect, rtol=1e-5)
  np.testing.assert_allclose(rel[0], expect / np.linalg.norm(z), rtol=1e-5)
  # any other z gives a larger distance
  other = mean + 0.1 * _rng(2).standard_normal(mean.shape)
  assert np.linalg.norm(z - other) > expect
  # prefix exclusion changes the token set
  raw_x, _ = M.feature_diversity(jnp.asarray(z), include_prefix=False, num_prefix=1)
  np.testing.assert_allclose(raw_x[0], np.linalg.norm(z[:, 1:] - z[:, 1:].mean(1, keepdims=True)), rtol=1e-5)


# --------------------------------------------------------------------------------------- token similarity

def test_token_similarity_known_answers():
  base = _rng(3).standard_normal((1, 1, 8))
  same = np.tile(base, (1, 6, 1))
  np.testing.assert_allclose(M.token_similarity(jnp.asarray(same, jnp.float32)), 1.0, atol=1e-5)
  # orthogonal patch tokens -> 0; a prefix token equal to one of them must be ignored
  eye = np.eye(6, 8)[None]
  with_cls = np.concatenate([eye[:, :1] * 5, eye], axis=1)
  np.testing.assert_allclose(M.token_similarity(jnp.asarray(with_cls, jnp.float32), num_prefix=1), 0.0,
                             atol=1e-6)
  # brute force on random tokens
  z = _rng(4).standard_normal((2, 5, 4)).astype(np.float32)
  u = z / np.linalg.norm(z, axis=-1, keepdims=True)
  cos = np.einsum("bid,bjd->bij", u, u)
  brute = (cos.sum((1, 2)) - np.trace(cos, axis1=1, axis2=2)) / 20
  np.testing.assert_allclose(M.token_similarity(jnp.asarray(z)), brute, rtol=1e-5)


# ------------------------------------------------------------------------------------ attention measures

def _random_attention(seed, shape):
  return jax.nn.softmax(jnp.asarray(_rng(seed).standard_normal(shape) * 3, jnp.float32), axis=-1)


def test_identical_attention_maps_have_similarity_one():
  a = _random_attention(5, (2, 3, 10, 10))
  np.testing.assert_allclose(M.attention_column_cosine(a, a), 1.0, atol=1e-5)
  stacked = jnp.stack([a, a, a])
  out = M.attention_similarity_matrix(stacked, threshold=0.9)
  np.testing.assert_allclose(out["matrix"], 1.0, atol=1e-5)
  np.testing.assert_allclose(out["adjacent_frac_above"], 1.0)


def test_column_cosine_brute_force_and_disjoint_maps():
  a, b = _random_attention(6, (1, 2, 6, 6)), _random_attention(7, (1, 2, 6, 6))
  an, bn = np.asarray(a), np.asarray(b)
  cos = (an * bn).sum(2) / (np.linalg.norm(an, axis=2) * np.linalg.norm(bn, axis=2))   # columns
  np.testing.assert_allclose(M.attention_column_cosine(a, b), cos.mean((1, 2)), rtol=1e-5)
  np.testing.assert_allclose(M.attention_column_cosine(a, b, per_head=True), cos.mean(2), rtol=1e-5)
  # permutation maps with disjoint supports: every column is orthogonal -> 0
  p = jnp.eye(4)[None, None]
  q = jnp.roll(jnp.eye(4), 1, axis=1)[None, None]
  np.testing.assert_allclose(M.attention_column_cosine(p, q), 0.0, atol=1e-6)


def test_attention_highpass_uniform_and_one_hot():
  n = 16
  uniform = jnp.full((1, 2, n, n), 1.0 / n)
  np.testing.assert_allclose(M.attention_highpass(uniform), 0.0, atol=1e-6)
  onehot = jnp.eye(n)[None, None]
  np.testing.assert_allclose(M.attention_highpass(onehot), np.sqrt(1 - 1 / n), rtol=1e-5)


# --------------------------------------------------------------------------------------------- frequency

def test_constant_feature_map_has_no_high_frequency_energy():
  z = jnp.asarray(np.tile(_rng(8).standard_normal((2, 1, 6)), (1, 1 + 16, 1)), jnp.float32)
  e = M.frequency_energy(z, (4, 4), num_prefix=1, num_bands=3)
  np.testing.assert_allclose(e[:, 0], 1.0, atol=1e-6)
  np.testing.assert_allclose(e[:, 1:], 0.0, atol=1e-6)
  np.testing.assert_allclose(M.hf_share_1d(z, num_prefix=1), 0.0, atol=1e-6)


def test_checkerboard_is_all_highest_band_and_shares_sum_to_one():
  h = w = 8
  checker = ((np.arange(h)[:, None] + np.arange(w)[None]) % 2 * 2 - 1).astype(np.float32)   # Nyquist, zero mean
  z = jnp.asarray(checker.reshape(1, h * w, 1))
  e = np.asarray(M.frequency_energy(z, (h, w), num_bands=4))
  np.testing.assert_allclose(e[0, -1], 1.0, atol=1e-6)
  rand = jnp.asarray(_rng(9).standard_normal((3, h * w, 5)), jnp.float32)
  e = np.asarray(M.frequency_energy(rand, (h, w), num_bands=4))
  np.testing.assert_allclose(e.sum(-1), 1.0, rtol=1e-5)
  # the high-frequency share equals the squared relative diversity of the patch tokens (Parseval)
  _, rel = M.feature_diversity(rand)
  np.testing.assert_allclose(1 - e[:, 0], np.asarray(rel) ** 2, rtol=1e-4)
  bands = M.radial_bands(h, w, 4)
  assert bands[0, 0] == 0 and set(np.unique(bands)) == {0, 1, 2, 3, 4}


# ------------------------------------------------------------------------------------- jitted collection

@pytest.fixture(scope="module")
def tiny_models():
  return {"plain": create_model("deit_tiny_patch16_224", **TINY),
          "reattn": create_model("deit_tiny_patch16_224", reattention=True, **TINY)}


def test_collect_shapes_and_batch_averaging(tiny_models):
  model = tiny_models["plain"]
  cfg = D.DiagnosticsConfig(threshold=0.5)
  batches = list(D.random_batches(32, batch_size=4, num_batches=2, seed=1))
  res = D.collect(model, batches, cfg, progress=False)
  depth = TINY["depth"]
  assert res["token_depth"] == list(range(depth + 1)) and res["attn_depth"] == [1, 2, 3]
  assert res["num_images"] == 8
  for key in ("feature_diversity", "feature_diversity_rel", "token_similarity", "hf_energy_share"):
    assert len(res[key]) == depth + 1 and all(np.isfinite(res[key])), key
  assert len(res["attn_highpass"]) == depth
  assert np.array(res["attn_similarity"]).shape == (depth, depth)
  np.testing.assert_allclose(np.diag(np.array(res["attn_similarity"])), 1.0, atol=1e-5)
  assert len(res["attn_similarity_offset"]) == depth - 1
  assert np.array(res["attn_similarity_offset_per_head"]).shape == (depth - 1, TINY["num_heads"])
  assert res["similar_blocks"] == sum(v > 0.5 for v in res["attn_similarity_offset"])
  assert len(res["hf_band_share"][0]) == cfg.num_bands + 1
  assert res["config"]["norm"] == "frobenius" and res["notes"] == []
  # the per-batch average equals the average of the two single-batch results (equal batch sizes)
  one = [D.collect(model, [b], cfg, progress=False) for b in batches]
  np.testing.assert_allclose(res["token_similarity"],
                             (np.array(one[0]["token_similarity"]) + np.array(one[1]["token_similarity"])) / 2,
                             rtol=1e-5)
  # padded (masked) images do not count
  padded = dict(batches[0])
  padded["image"] = np.concatenate([batches[0]["image"], 100 * np.ones_like(batches[0]["image"])])
  padded["mask"] = np.concatenate([np.ones(4), np.zeros(4)]).astype(np.float32)
  res_pad = D.collect(model, [padded], cfg, progress=False)
  np.testing.assert_allclose(res_pad["feature_diversity"], one[0]["feature_diversity"], rtol=1e-5)


def test_collect_matches_direct_measures_from_intermediates(tiny_models):
  model = tiny_models["reattn"]
  images = next(D.random_batches(32, batch_size=3, num_batches=1, seed=2))["image"]
  res = D.collect(model, [images], progress=False)
  model.eval()
  _, inter = model(jnp.asarray(images), return_intermediates=True)
  z = inter["tokens"][-1]
  np.testing.assert_allclose(res["token_similarity"][-1], float(M.token_similarity(z, num_prefix=1).mean()),
                             rtol=1e-4)
  a1, a2 = inter["attn"][0], inter["attn"][1]
  np.testing.assert_allclose(res["attn_similarity_offset"][0], float(M.attention_column_cosine(a1, a2).mean()),
                             rtol=1e-4)


def test_varying_token_counts_skip_cross_layer_similarity():
  # EViT: tokens shrink after block 2 -> similarity across the reorganisation is undefined
  model = create_model("deit_small_patch16_shrink_base", img_size=32, patch_size=8, depth=4, embed_dim=32,
                       num_heads=2, num_classes=10, keep_rate_blocks=(1,), keep_rate=0.5)
  res = D.collect(model, D.random_batches(32, batch_size=2, num_batches=1), progress=False)
  assert res["attn_similarity_offset"][0] is not None        # blocks 1 and 2 both see 17 tokens
  assert res["attn_similarity_offset"][1] is None            # block 2 (17 tokens) vs block 3 (fewer)
  assert res["attn_similarity"][1][2] is None
  assert res["hf_band_share"][2][0] is None and res["hf_domain"][2] == "1d"
  assert any("skipped" in n for n in res["notes"])


def test_tuple_attention_and_stage_grids_are_handled():
  """A Shunted-like intermediates dict (no model needed): per-head-group tuples, two stages."""
  from vit_jax_fix.diagnostics.collect import _measures
  b = 2
  s1 = [jnp.asarray(_rng(i).standard_normal((b, 16, 8)), jnp.float32) for i in range(2)]
  s2 = [jnp.asarray(_rng(i).standard_normal((b, 4, 12)), jnp.float32) for i in range(2)]
  attn1 = (_random_attention(0, (b, 1, 16, 4)), _random_attention(1, (b, 1, 16, 16)))
  attn2 = (_random_attention(2, (b, 2, 4, 4)),)
  inter = {"tokens": s1 + s2, "attn": [attn1, attn1, attn2, attn2]}     # no 'embed', like Shunted
  images = jnp.zeros((b, 16, 16, 3))
  sums, static = _measures(inter, images, jnp.ones(b), num_prefix=0, model_grid=None, cfg=D.DiagnosticsConfig())
  res = D.finalize(jax.tree.map(np.asarray, sums), static, D.DiagnosticsConfig(), num_prefix=0)
  assert res["token_depth"] == [1, 2, 3, 4] and len(res["token_similarity"]) == 4
  assert res["hf_domain"] == ["2d"] * 4                       # 4x4 grid at stage 1, 2x2 at stage 2
  np.testing.assert_allclose(res["attn_similarity_offset"][0], 1.0, atol=1e-5)   # identical maps
  assert res["attn_similarity_offset"][1] is None             # stage change
  np.testing.assert_allclose(res["attn_similarity_offset"][2], 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------- logging and API

class _Writer:
  def __init__(self):
    self.calls = []

  def write_scalars(self, step, values):
    self.calls.append((step, dict(values)))


class _TorchWriter:
  def __init__(self):
    self.calls = []

  def add_scalar(self, name, value, step):
    self.calls.append((name, value, step))


def test_log_diagnostics_and_hook(tiny_models):
  batches = list(D.random_batches(32, batch_size=2, num_batches=1))
  hook = D.DiagnosticsHook(every_steps=10, batches=batches)
  w = _Writer()
  assert hook(5, tiny_models["plain"], w) is None and not w.calls
  res = hook(10, tiny_models["plain"], w)
  assert res is not None and w.calls[0][0] == 10
  values = w.calls[0][1]
  assert "collapse/feature_diversity_rel/block_00" in values and "collapse/attn_highpass/block_03" in values
  assert "collapse/attn_similarity_offset/block_02" in values and "collapse/similar_blocks" in values
  tw = _TorchWriter()
  D.log_diagnostics(tw, 3, res, prefix="diag")
  assert len(tw.calls) == len(values) and all(c[2] == 3 and c[0].startswith("diag/") for c in tw.calls)


def test_cli_loads_trainer_checkpoints(tmp_path):
  """The CLI (an application) loads trainer checkpoints; the diagnostics library never imports the trainer."""
  from vit_jax_fix import diagnose
  from vit_jax_fix.interop.testing import random_model
  from vit_jax_fix.train.checkpoint import CheckpointMismatchError, save_model
  model = random_model("deit_tiny_patch16_224", **TINY)
  save_model(model, str(tmp_path), name="deit_tiny_patch16_224", overrides=TINY)
  with pytest.warns(UserWarning, match="ignored"):
    loaded = diagnose.load_checkpoint_model(str(tmp_path), "deit_tiny_patch16_224", depth=5)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  model.eval()
  np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)
  with pytest.raises(CheckpointMismatchError, match="deit_tiny_patch16_224"):
    diagnose.load_checkpoint_model(str(tmp_path), "deit_small_patch16_224")
  assert not hasattr(D, "load_checkpoint_model")


def test_cli_two_models_writes_json_and_plots(tmp_path):
  from vit_jax_fix import diagnose
  spec = ",".join(f"{k}={v}" for k, v in TINY.items())
  out = tmp_path / "diag"
  diagnose.main(["--model", f"deit_tiny_patch16_224:{spec}", "--model", f"deit_tiny_patch16_224:{spec},attn_scale=True",
                 "--label", "plain", "--label", "attnscale", "--data", "random", "--batch-size", "4",
                 "--num-batches", "1", "--threshold", "0.8", "--out", str(out), "--no-progress"])
  data = json.loads((out / "diagnostics.json").read_text())
  assert set(data) == {"plain", "attnscale"}
  for res in data.values():
    for key in ("feature_diversity", "feature_diversity_rel", "token_similarity", "hf_energy_share",
                "hf_band_share", "attn_highpass", "attn_similarity", "attn_similarity_offset", "similar_blocks",
                "config", "notes"):
      assert key in res
    assert res["config"]["threshold"] == 0.8 and len(res["token_similarity"]) == TINY["depth"] + 1
  for png in ("measures_vs_depth.png", "attn_similarity.png", "hf_bands.png"):
    assert (out / png).stat().st_size > 1000
    assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_cli_model_spec_parsing():
  from vit_jax_fix.diagnose import parse_model_spec
  assert parse_model_spec("deit_small_patch16_shrink_base:keep_rate_blocks=(3,6),fuse_token=False,"
                          "aug_shortcut=circulant2") == (
      "deit_small_patch16_shrink_base", {"keep_rate_blocks": (3, 6), "fuse_token": False,
                                         "aug_shortcut": "circulant2"})
