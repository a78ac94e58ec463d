"""Periodic collapse diagnostics in the trainer (config.diagnostics, issue #7).

A 4-step run on an FSDP-sharded mesh measures at init and every 2 steps: the scalars land in metrics.jsonl
and TensorBoard, the full results and plots in <workdir>/diagnostics/, and the logged values are those of
`diagnostics.collect` on the checkpointed weights and the same eval batches.
"""
import glob
import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf

from vit_jax_fix import diagnostics
from vit_jax_fix.data import build_eval_iterator
from vit_jax_fix.models import registry
from vit_jax_fix.train import checkpoint as ckpt
from vit_jax_fix.train import config as C
from vit_jax_fix.train import loop
from vit_jax_fix.train import metrics as metrics_lib
from vit_jax_fix.train import sharding as S

from tests import train_configs

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  base = tmp_path_factory.mktemp("diag")
  c = train_configs.folder_config(train_configs.make_folder(base), model="deit_small_patch16_224",
                                  overrides=TINY, **{
      "total_steps": 4, "schedule.warmup_steps": 1, "optimizer.lr": 1e-3, "ema.decay": 0.0,
      "checkpoint_every_steps": 2, "sharding.strategy": "fsdp", "sharding.fsdp_min_size": 16,
      "diagnostics.every_steps": 2, "diagnostics.num_batches": 2, "diagnostics.batch_size": 4})
  workdir = base / "w"
  loop.train_and_evaluate(c, str(workdir), mesh=S.make_mesh(1, 2, devices=jax.devices()[:2]))
  return c, workdir


def test_measured_at_init_and_every_n_steps(run):
  _, workdir = run
  rows = [r for r in metrics_lib.read_jsonl(str(workdir / "metrics.jsonl")) if "collapse/similar_blocks" in r]
  assert [r["step"] for r in rows] == [0, 2, 4]
  for r in rows:
    for block in range(TINY["depth"] + 1):     # token measures: 0 = embedding, then every block
      assert f"collapse/feature_diversity/block_{block:02d}" in r
      assert f"collapse/token_similarity/block_{block:02d}" in r
  assert rows[0]["collapse/feature_diversity/block_03"] != rows[-1]["collapse/feature_diversity/block_03"]
  # TensorBoard has the same scalars
  tags = set()
  for f in glob.glob(str(workdir / "tensorboard" / "events.*")):
    for e in tf.compat.v1.train.summary_iterator(f):
      tags.update(v.tag for v in e.summary.value)
  assert "collapse/similar_blocks" in tags and "collapse/feature_diversity/block_03" in tags
  out = workdir / "diagnostics"
  assert sorted(os.listdir(out)) == sorted(["step_0.json", "step_2.json", "step_4.json", "measures_vs_depth.png",
                                            "attn_similarity.png", "hf_bands.png"])


def test_logged_values_are_those_of_the_checkpointed_model(run):
  config, workdir = run
  model = ckpt.load_model(str(workdir))       # latest checkpoint: step 4, raw weights
  defaults = registry.model_defaults(config.model.name)
  batches = list(build_eval_iterator(config.data, global_batch_size=4, model_defaults=defaults))[:2]
  expected = diagnostics.collect(model, batches, diagnostics.DiagnosticsConfig(threshold=0.9), progress=False)
  with open(workdir / "diagnostics" / "step_4.json") as f:
    logged = json.load(f)
  for key in ("feature_diversity", "token_similarity", "attn_similarity_offset", "hf_energy_share",
              "attn_highpass"):
    np.testing.assert_allclose(np.array(logged[key], float), np.array(expected[key], float), rtol=1e-5, atol=1e-6)
  row = [r for r in metrics_lib.read_jsonl(str(workdir / "metrics.jsonl")) if r["step"] == 4 and
         "collapse/similar_blocks" in r][0]
  assert row["collapse/similar_blocks"] == expected["similar_blocks"]


def test_bad_diagnostics_config_is_rejected():
  c = C.base_config()
  c.diagnostics.every_steps = -1
  with pytest.raises(ValueError, match="config.diagnostics"):
    C.validate(c)
  c = C.base_config()
  c.diagnostics.every_step = 10
  with pytest.raises(KeyError, match="every_steps"):
    C.validate(c)
