"""EViT keep-rate schedule in the trainer (config.keep_rate_schedule, issue #3).

A short run of a tiny EViT on a generated image folder: the keep rate logged per step follows the official
cosine warm-up quantised to the grid, the trainer compiles exactly one train step per distinct keep rate (at
most the documented `max_programs`), each of those programs really runs fewer tokens at a lower rate (XLA
FLOPs), and a run killed mid-ramp resumes bit-identical to an uninterrupted one.
"""
import os

import jax
import numpy as np
import pytest
from flax import nnx

from vit_jax_fix.models import cost
from vit_jax_fix.models import keep_rate as keep_rate_lib
from vit_jax_fix.train import checkpoint as ckpt
from vit_jax_fix.train import loop
from vit_jax_fix.train import metrics as metrics_lib
from vit_jax_fix.train import sharding as S

from tests import train_configs

EVIT_TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, keep_rate=0.5,
                 keep_rate_blocks=(1,), fuse_token=True)
STEPS_PER_EPOCH = 3       # 24 images, batch 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return train_configs.make_folder(tmp_path_factory.mktemp("krs_data"))


def _config(folder, **kw):
  c = train_configs.folder_config(folder, model="deit_small_patch16_shrink_base", overrides=EVIT_TINY, **{
      "total_steps": 12, "schedule.warmup_steps": 2, "ema.decay": 0.0, "log_every_steps": 1,
      "checkpoint_every_steps": 3,
      "keep_rate_schedule.enabled": True,
      "keep_rate_schedule.start_epochs": 1.0,      # 3 updates at keep rate 1
      "keep_rate_schedule.ramp_epochs": 2.0,       # cosine over 6 updates
      "keep_rate_schedule.granularity": 0.25})     # grid {0.5, 0.75, 1}: at most 3 programs
  return train_configs.set_keys(c, **kw)


def _mesh():
  return S.make_mesh(2, 1, devices=jax.devices()[:2])


def _flat(tree):
  return np.concatenate([np.ravel(v) for v in jax.tree.leaves(tree)])


def test_schedule_compiles_one_program_per_keep_rate_and_resumes_exactly(folder, tmp_path, monkeypatch):
  setups = []
  real_setup = loop.Setup

  def recording_setup(*a, **k):
    setups.append(real_setup(*a, **k))
    return setups[-1]
  monkeypatch.setattr(loop, "Setup", recording_setup)

  config = _config(folder)
  loop.train_and_evaluate(config, str(tmp_path / "full"), mesh=_mesh())
  setup = setups[-1]
  assert setup.keep_rate.max_programs == keep_rate_lib.max_programs(0.5, 0.25) == 3
  assert setup.keep_rate.start_step == 3 and setup.keep_rate.ramp_steps == 6

  # the logged keep rate of micro-step s (1-based row) is the quantised official schedule at update s - 1
  rows = [r for r in metrics_lib.read_jsonl(str(tmp_path / "full" / "metrics.jsonl")) if "train/keep_rate" in r]
  logged = [r["train/keep_rate"] for r in rows]
  expected = [keep_rate_lib.keep_rate_at(s, base_keep_rate=0.5, start_step=3, ramp_steps=6, granularity=0.25)
              for s in range(12)]
  assert logged == expected
  assert logged[:3] == [1.0] * 3 and logged[-3:] == [0.5] * 3 and set(logged) == {0.5, 0.75, 1.0}

  # one compiled train step per distinct keep rate, never more than the documented bound
  assert sorted(setup.train_programs.programs) == [0.5, 0.75, 1.0]
  assert setup.train_programs.num_compiled == 3 <= setup.keep_rate.max_programs

  # each program runs the configured block at its own rate: fewer tokens, fewer FLOPs. XLA counts a scan
  # body once and at keep rate 1 the identical blocks run under lax.scan, so whole programs are compared
  # only between rates < 1; the forward of each program's model is counted with its scans unrolled.
  state = setup.abstract_with_shardings()
  batch = {"image": jax.ShapeDtypeStruct((8, 16, 16, 3), np.float32), "label": jax.ShapeDtypeStruct((8,), np.int32)}
  step_flops = {r: setup.train_programs.program(r).lower(state, batch).cost_analysis()["flops"]
                for r in setup.train_programs.programs}
  assert step_flops[0.5] < step_flops[0.75]
  fwd_flops = {}
  for r in (0.5, 0.75, 1.0):
    md = setup.model_def.with_keep_rate(r)
    model = nnx.merge(md.graphdef_train, md.params_tmpl, md.rng_tmpl, md.stats_tmpl)
    assert [b.keep_rate for b in model.block_list()] == [1.0, r, 1.0]
    fwd_flops[r] = cost.xla_flops(model, (8, 16, 16, 3))
  assert fwd_flops[0.5] < fwd_flops[0.75] < fwd_flops[1.0]

  # killed in the middle of the ramp (after step 5, checkpoint at 3), resumed: identical to the full run
  crashed = tmp_path / "crashed"
  with pytest.raises(RuntimeError, match="debug_crash_at_step"):
    loop.train_and_evaluate(_config(folder, debug_crash_at_step=5), str(crashed), mesh=_mesh())
  assert max(int(d) for d in os.listdir(ckpt.checkpoint_dir(str(crashed))) if d.isdigit()) == 3
  loop.train_and_evaluate(config, str(crashed), mesh=_mesh())
  np.testing.assert_array_equal(_flat(ckpt.load_state_dicts(str(crashed))[2]),
                                _flat(ckpt.load_state_dicts(str(tmp_path / "full"))[2]))
  # the resumed process compiled only the rates of the steps it still ran (3 onwards)
  assert sorted(setups[-1].train_programs.programs) == sorted(set(expected[3:]))


def test_schedule_needs_an_evit_model(folder, tmp_path):
  config = _config(folder)
  config.model.name = "deit_small_patch16_224"
  config.model.overrides = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
  with pytest.raises(loop.ConfigError, match="keep_rate_schedule.*keep_rate"):
    loop.Setup(config, _mesh())


def test_every_schedule_value_is_on_the_grid():
  grid = keep_rate_lib.keep_rate_grid(0.7, 0.05)
  schedule = keep_rate_lib.KeepRateSchedule(0.7, start_step=10, ramp_steps=1000, granularity=0.05)
  values = [schedule(t) for t in range(1200)]
  assert values == [keep_rate_lib.keep_rate_at(t, base_keep_rate=0.7, start_step=10, ramp_steps=1000,
                                               granularity=0.05) for t in range(1200)]
  assert set(values) == set(grid) and len(set(values)) == schedule.max_programs == 7
  with pytest.raises(ValueError, match="granularity must be > 0"):
    keep_rate_lib.KeepRateSchedule(0.7, granularity=0.0)          # refused when built, not at the first step
