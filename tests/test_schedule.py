"""The learning-rate schedule against timm's own scheduler, driven as the official DeiT main.py drives it.

main.py builds the scheduler with `timm.scheduler.create_scheduler(args, optimizer)` from its argparse
arguments (sched 'cosine', epochs, warmup_epochs, warmup_lr, min_lr, decay_rate, cooldown_epochs 10 -- which
only lengthens the epoch count create_scheduler returns and main.py discards -- no lr noise), trains epoch e
with the optimizer's current rate for every update, and calls `lr_scheduler.step(epoch)` after the epoch.
Here that loop runs over whole runs, recording the rate of every update, and every update of
`config.schedule.step_per = 'epoch'` (built from the repository's own configs, through the trainer's
steps-per-epoch and total-updates arithmetic) must equal it to float32 precision.
"""
import argparse
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax_fix.errors import ConfigError
from vit_jax_fix.interop.torch_compat import import_timm
from vit_jax_fix.train import checkpoint as ckpt
from vit_jax_fix.train import config as C
from vit_jax_fix.train import optim

import_timm()
import torch  # noqa: E402  (after import_timm, which prepares torchvision)
from timm.scheduler import create_scheduler  # noqa: E402

# DeiT main.py's argparse defaults for everything create_scheduler reads.
DEIT_SCHED_DEFAULTS = dict(sched="cosine", epochs=300, lr=5e-4, lr_noise=None, lr_noise_pct=0.67, lr_noise_std=1.0,
                           warmup_lr=1e-6, min_lr=1e-5, decay_epochs=30, warmup_epochs=5, cooldown_epochs=10,
                           patience_epochs=10, decay_rate=0.1, seed=0)
RTOL = 5e-6  # float32 evaluation of the same formula: measured <= 1.5e-6; one epoch of offset is >= 3e-4


def official_lrs(updates_per_epoch: int, **args) -> np.ndarray:
  """The rate of every optimizer update of a DeiT main.py run: `args` are its command-line values (lr already
  scaled as main.py scales it)."""
  args = argparse.Namespace(**dict(DEIT_SCHED_DEFAULTS, **args))
  optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
  lr_scheduler, _ = create_scheduler(args, optimizer)
  lrs = []
  for epoch in range(0, args.epochs):             # start_epoch 0: a run from scratch
    lrs += [optimizer.param_groups[0]["lr"]] * updates_per_epoch   # train_one_epoch
    lr_scheduler.step(epoch)
  return np.asarray(lrs)


def ours(config, updates_per_epoch: int) -> np.ndarray:
  num_train = config.batch_size * updates_per_epoch + config.batch_size // 2   # drop_last: a partial batch
  spe, total = C.steps_per_epoch(config, num_train), C.total_steps(config, num_train)
  assert spe == updates_per_epoch
  return np.asarray(optim.schedule(config, total, spe)(jnp.arange(total)))


def get_config(name, arg=""):
  c = importlib.import_module(f"configs.{name}").get_config(arg)
  C.validate(c)
  return c


# (config, config arg, updates per epoch, epochs override, the official command's scheduler values)
CASES = {
    "deit_s_short": ("deit_s", "", 7, 12, dict(epochs=12, lr=5e-4 * 1024 / 512)),
    "deit_s": ("deit_s", "", 3, None, dict(lr=5e-4 * 1024 / 512)),
    # README_revenge: --lr 4e-3 --unscale-lr --epochs 800 --warmup-epochs 5 --warmup-lr 1e-6, batch 8 x 256
    "deit3_s": ("deit3_s", "", 3, None, dict(epochs=800, lr=4e-3)),
    # EViT fine-tune: lr 2e-5 x 2048 / 512, no warm-up, min lr 2e-6, 30 epochs (epoch 0 at the base rate)
    "evit_finetune": ("evit_s", "finetune", 5, None, dict(epochs=30, lr=2e-5 * 2048 / 512, warmup_epochs=0,
                                                          min_lr=2e-6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_epoch_schedule_is_timms_as_main_py_steps_it(case):
  name, arg, spe, epochs, official = CASES[case]
  c = get_config(name, arg)
  assert c.schedule.step_per == "epoch"           # the paper recipes run the official schedule
  if epochs:
    c.num_epochs = epochs
  ref = official_lrs(spe, **official)
  got = ours(c, spe)
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=RTOL, atol=0)
  # What is being matched: constant within an epoch; epochs 0 and 1 both at the warm-up start; the cosine
  # counted from epoch 0 (warmup_prefix=False), so after the warm-up epoch w + 1 trains at cos(pi w / E), the
  # peak itself is never trained at; the last epoch at the value for E - 2, still above min_lr.
  per_epoch = got.reshape(-1, spe)
  assert (per_epoch == per_epoch[:, :1]).all()
  w, peak, lr_min = official.get("warmup_epochs", 5), official["lr"], official.get("min_lr", 1e-5)
  n = official.get("epochs", 300)
  if w:
    assert per_epoch[0, 0] == per_epoch[1, 0] == np.float32(1e-6)
    assert per_epoch[w + 1, 0] == pytest.approx(lr_min + 0.5 * (peak - lr_min) * (1 + np.cos(np.pi * w / n)),
                                                rel=RTOL)
  else:
    assert per_epoch[0, 0] == per_epoch[1, 0] == pytest.approx(peak, rel=RTOL)
  assert per_epoch.max() < peak if w else True
  assert per_epoch[-1, 0] > lr_min


def test_schedule_reaches_the_optimizer_update_by_update():
  """The schedule is read with the optimizer's own update count (first update at u = 0): with a unit gradient
  Adam's step is lr / (1 + eps), so the parameter moves by the official rate at every update (to 1e-4: Adam's
  float32 bias corrections; a count off by one would put a whole epoch boundary, >= 2x, in the wrong place)."""
  c = get_config("deit_s")
  c.num_epochs = 12
  spe = 7
  tx, _ = optim.make_optimizer(c, {"w": jax.ShapeDtypeStruct((), jnp.float32)}, 12 * spe, spe)
  params = {"w": jnp.zeros((), jnp.float32)}

  def step(carry, _):
    params, state = carry
    updates, state = tx.update({"w": jnp.ones(())}, state, params)
    return (optax.apply_updates(params, updates), state), -updates["w"]
  _, applied = jax.lax.scan(step, (params, tx.init(params)), length=12 * spe)
  np.testing.assert_allclose(np.asarray(applied) * (1 + c.optimizer.eps),
                             official_lrs(spe, epochs=12, lr=1e-3), rtol=1e-4)


def test_update_form_is_the_default_and_the_demos_keep_it():
  assert C.base_config().schedule.step_per == "update"
  assert get_config("deit_s", "demo").schedule.step_per == "update"
  c = C.base_config()
  sched = optim.schedule(c, total_updates=100, steps_per_epoch=10)
  assert float(sched(3)) != float(sched(4))       # moves every update


def test_unknown_step_per_is_a_config_error():
  c = C.base_config()
  c.schedule.step_per = "epochs"
  with pytest.raises(ConfigError, match=r"step_per='epochs'.*'update'.*'epoch'"):
    C.validate(c)
  with pytest.raises(ConfigError, match="step_per"):
    optim.schedule(c, 100, 10)


def test_workdirs_written_before_step_per_existed_resume():
  """An old workdir's config.json has no schedule.step_per: it ran the per-update schedule, the default."""
  import json
  old = json.loads(C.base_config().to_json_best_effort())
  del old["schedule"]["step_per"]
  assert ckpt.config_differences(old, C.base_config()) == []
  c = C.base_config()
  c.schedule.step_per = "epoch"                   # a new schedule is a new training: refused
  assert ckpt.config_differences(old, c) == ["schedule.step_per: 'update' in the workdir, 'epoch' now"]


def timm_train_py_lrs(updates_per_epoch: int, **args) -> np.ndarray:
  """The rate of every optimizer update of a run of timm's train.py (DeepViT, AugViT): create_scheduler's
  second value, cosine epochs + cooldown_epochs, is the number of epochs trained, and the loop calls
  `lr_scheduler.step(epoch + 1, metric)` after each epoch (`step_update` is a no-op for a per-epoch cosine)."""
  args = argparse.Namespace(**dict(DEIT_SCHED_DEFAULTS, **args))
  optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
  lr_scheduler, num_epochs = create_scheduler(args, optimizer)
  lrs = []
  for epoch in range(0, num_epochs):
    lrs += [optimizer.param_groups[0]["lr"]] * updates_per_epoch
    lr_scheduler.step(epoch + 1, 0.0)
  return np.asarray(lrs)


# timm train.py runs: (config, updates per epoch, the yaml / readme command's scheduler values)
TIMM_TRAIN_CASES = {
    "deepvit_16b": ("deepvit_16b", 3, dict(lr=5e-4)),
    "augvit_s": ("augvit_s", 2, dict(lr=1e-3)),
}


@pytest.mark.parametrize("case", list(TIMM_TRAIN_CASES))
def test_timm_train_py_schedule_with_cooldown(case):
  """DeepViT and AugViT trained with timm's train.py: 300 cosine epochs stepped as that loop steps them (epoch e
  at timm's value for e, one epoch earlier than DeiT's main.py), then 10 cooldown epochs at min_lr: 310 epochs."""
  name, spe, official = TIMM_TRAIN_CASES[case]
  c = get_config(name)
  assert (c.schedule.step_per, c.schedule.cooldown_epochs) == ("epoch_timm", 10)
  ref = timm_train_py_lrs(spe, **official)
  got = ours(c, spe)
  assert got.shape == ref.shape == (310 * spe,)
  np.testing.assert_allclose(got, ref, rtol=RTOL, atol=0)
  per_epoch = got.reshape(-1, spe)
  assert per_epoch[0, 0] == np.float32(1e-6) and per_epoch[1, 0] > per_epoch[0, 0]   # no repeated epoch 0
  assert (per_epoch[300:] == np.float32(1e-5)).all() and per_epoch[299, 0] > 1e-5


def test_cooldown_lengthens_the_run_at_min_lr():
  """cooldown_epochs adds updates after the cosine (total_steps counts the cosine) in every form; the
  per-update cosine still ends at min_lr where the cooldown starts; the demos (the README's first command)
  have none."""
  c = C.base_config()
  c.num_epochs, c.batch_size, c.schedule.warmup_epochs, c.optimizer.lr_batch_scale = 4, 10, 1, 0
  c.schedule.cooldown_epochs = 2
  assert C.total_steps(c, 100) == 60
  c.total_steps = 30
  assert C.total_steps(c, 100) == 50
  c.total_steps = -1
  lrs = np.asarray(optim.schedule(c, 60, 10)(jnp.arange(60)))
  assert lrs[39] > 1.001e-5 and np.allclose(lrs[40:], 1e-5, rtol=1e-6) and lrs[5] < lrs[15] > lrs[30]
  for name in ("augvit_s", "deepvit_16b", "deepvit_32b"):
    assert get_config(name, "demo").schedule.cooldown_epochs == 0
  c.schedule.cooldown_epochs = -1
  with pytest.raises(ConfigError, match="cooldown_epochs"):
    C.validate(c)
