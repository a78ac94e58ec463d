"""DeiT distillation: the distilled models (distillation token, `head_dist`), checked against the official
listings and timm's `deit_*_distilled_patch16_224`; DeiT's `DistillationLoss`; the teacher in the train step."""
import numpy as np
import pytest
from flax import nnx

import vit_jax_fix
from vit_jax_fix.interop import from_torch_state_dict, testing, to_torch_state_dict, torch_keys
from vit_jax_fix.interop.timm_models import create_timm_model, default_layout, timm_config
from vit_jax_fix.interop.torch_compat import import_timm
from vit_jax_fix.models.registry import count_params, get_spec
from tests.test_models import reference_listing

timm = import_timm()
import torch  # noqa: E402  (after import_timm, which prepares torchvision)

# Parameter counts of the official DistilledVisionTransformer (reference: DeiT models.py, derived).
OFFICIAL_PARAMS = {"tiny": 5_910_800, "small": 22_436_432, "base": 87_338_192}
TINY = dict(img_size=32, patch_size=8, embed_dim=64, num_heads=4, depth=2, num_classes=10)


@pytest.mark.parametrize("size", sorted(OFFICIAL_PARAMS))
def test_distilled_counts_and_keys_equal_official(size):
  """The official listing of deit_<size>_patch16_224 plus what DistilledVisionTransformer adds: dist_token,
  head_dist, and a pos_embed slot for the second token."""
  name = f"deit_{size}_distilled_patch16_224"
  model = nnx.eval_shape(lambda: vit_jax_fix.create_model(name))
  assert count_params(model) == OFFICIAL_PARAMS[size]
  _, keys = reference_listing(f"deit_{size}_patch16_224")
  d = keys["cls_token"][-1]
  keys.update({"dist_token": (1, 1, d), "pos_embed": (1, 14 * 14 + 2, d), "head_dist.weight": (1000, d),
               "head_dist.bias": (1000,)})
  assert torch_keys(model) == keys
  assert get_spec(name).weights.sha256 in get_spec(name).weights.url


def _images(seed=1):
  x = np.random.default_rng(seed).normal(size=(3, 32, 32, 3)).astype(np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def test_distilled_timm_parity_both_modes():
  """Export to timm (strict load): the same averaged logits in eval and the same two heads in training
  (timm after set_distilled_training(True)); then timm's random weights imported give the same logits."""
  name = "deit_small_distilled_patch16_224"
  assert default_layout(name) == "timm" and timm_config(name, **TINY)[0] == name
  model = testing.random_model(name, **TINY)
  tmodel = create_timm_model(name, **TINY)
  tmodel.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                          to_torch_state_dict(model, layout="timm").items()}, strict=True)
  x, xt = _images()
  tmodel.eval()
  with torch.no_grad():
    ref = tmodel(xt).numpy()
  np.testing.assert_allclose(testing.logits(model, x), ref, atol=1e-4, rtol=0)
  # Training mode: the two heads separately (drop rates are 0, so training mode is deterministic).
  tmodel.train()
  tmodel.set_distilled_training(True)
  with torch.no_grad():
    ref_cls, ref_dist = (t.numpy() for t in tmodel(xt))
  assert np.abs(ref_cls - ref_dist).max() > 0.1, "the two heads must differ for this test to mean anything"
  model.train()
  import jax
  with jax.default_matmul_precision("highest"):
    got_cls, got_dist = model(jax.numpy.asarray(x))
  np.testing.assert_allclose(np.asarray(got_cls), ref_cls, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(got_dist), ref_dist, atol=1e-4, rtol=0)
  # timm -> ours
  with torch.no_grad():
    for p in tmodel.parameters():
      p.add_(0.2 * torch.randn_like(p))
  back = from_torch_state_dict(testing.random_model(name, seed=3, **TINY), tmodel.state_dict(), layout="timm")
  tmodel.eval()
  with torch.no_grad():
    np.testing.assert_allclose(testing.logits(back, x), tmodel(xt).numpy(), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------ the loss and the step

def _torch_distillation_loss(z_cls, z_dist, z_teacher, targets, kind, alpha, tau):
  """DeiT's losses.DistillationLoss as the reference states it, with torch's own functions: the base is timm's
  SoftTargetCrossEntropy on the mixed targets."""
  F = torch.nn.functional
  z_cls, z_dist, z_teacher, targets = (torch.from_numpy(np.asarray(a, np.float64))
                                        for a in (z_cls, z_dist, z_teacher, targets))
  base = torch.sum(-targets * F.log_softmax(z_cls, dim=-1), dim=-1).mean()
  if kind == "soft":
    d = F.kl_div(F.log_softmax(z_dist / tau, dim=1), F.log_softmax(z_teacher / tau, dim=1), reduction="sum",
                 log_target=True) * (tau * tau) / z_dist.numel()
  else:
    d = F.cross_entropy(z_dist, z_teacher.argmax(dim=1))
  return float(base * (1 - alpha) + d * alpha)


@pytest.mark.parametrize("kind,alpha,tau,two_heads", [("soft", 0.5, 1.0, True), ("soft", 0.3, 3.0, True),
                                                      ("hard", 0.5, 1.0, True), ("hard", 0.7, 1.0, False)])
def test_loss_equals_deit_distillation_loss(kind, alpha, tau, two_heads):
  from vit_jax_fix.train import distill, losses
  rng = np.random.default_rng(0)
  z_cls, z_dist, z_t = (3 * rng.normal(size=(6, 10)).astype(np.float32) for _ in range(3))
  if not two_heads:      # a one-head student (CaiT) is distilled through its class token
    z_dist = z_cls
  targets = rng.dirichlet(np.ones(10), size=6).astype(np.float32)
  loss = distill.make_loss(losses.loss_fn("softmax_ce"), kind, alpha, tau)
  got = float(loss((z_cls, z_dist) if two_heads else z_cls, targets, z_t))
  ref = _torch_distillation_loss(z_cls, z_dist, z_t, targets, kind, alpha, tau)
  np.testing.assert_allclose(got, ref, rtol=2e-6)
  # 'none' is the base loss on the class head alone, as DeiT with --distillation-type none.
  none = distill.make_loss(losses.loss_fn("softmax_ce"), "none")
  np.testing.assert_allclose(float(none((z_cls, z_dist), targets)),
                             _torch_distillation_loss(z_cls, z_dist, z_t, targets, "hard", 0.0, 1.0), rtol=2e-6)


def test_train_step_runs_the_teacher_on_the_mixed_images():
  """The step's loss is DeiT's with the teacher's logits on the mixed batch (not on the clean one), and the
  teacher gets no update."""
  import jax
  import jax.numpy as jnp
  import optax
  from vit_jax_fix.data import mixup_cutmix
  from vit_jax_fix.train import distill, losses, state as state_lib, steps
  tiny = dict(TINY, embed_dim=32, num_heads=2, depth=1)
  student = state_lib.ModelDef.create("deit_tiny_distilled_patch16_224", **tiny)
  teacher = state_lib.ModelDef.create("deit_tiny_patch16_224", **tiny)
  t_params, t_stats = teacher.init(7)
  noise = np.random.default_rng(1)      # weights far from init: the teacher's logits depend on the image
  t_params = jax.tree.map(lambda x: x + 0.3 * noise.normal(size=x.shape).astype(np.float32), t_params)
  t_weights = {"params": t_params, "batch_stats": t_stats}
  teacher_logits = lambda w, images: teacher.merge(w["params"], w["batch_stats"], train=False)(images)
  mix_kwargs = dict(num_classes=10, mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, label_smoothing=0.1)
  tx = optax.sgd(0.0)
  state = state_lib.init_train_state(student, tx, 0, ema=False)
  step = steps.make_train_step(student, tx, loss="softmax_ce", mix_kwargs=mix_kwargs, ema_decay=0.0,
                               lr_schedule=lambda n: 0.0, train_mode=False,
                               distill=("soft", 0.5, 2.0, teacher_logits))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
           "label": jnp.asarray([0, 1, 2, 3], jnp.int32)}
  _, metrics = jax.jit(step)(dict(state), batch, t_weights)
  # The same mixing as the step: the run's key folded with the step number, split into (mix, dropout).
  k_mix, _ = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"]))
  images, targets = mixup_cutmix(k_mix, batch["image"], batch["label"], **mix_kwargs)
  outputs = student.merge(state["params"], state["batch_stats"], train=True)(images)
  loss = distill.make_loss(losses.loss_fn("softmax_ce"), "soft", 0.5, 2.0)
  on_mixed = float(loss(outputs, targets, teacher_logits(t_weights, images)))
  on_clean = float(loss(outputs, targets, teacher_logits(t_weights, batch["image"])))
  np.testing.assert_allclose(float(metrics["train/loss"]), on_mixed, rtol=1e-5)
  assert abs(on_mixed - on_clean) > 20 * 1e-5 * on_mixed, "mixing must change the teacher targets"


@pytest.mark.slow
def test_distilled_demo_config_trains(demo_data_dir, tmp_path):
  """configs/deit_s_distilled.py:demo (hard distillation from its random tiny teacher) at a tiny size: two
  steps and the final evaluation, which averages the two heads."""
  import math
  from configs import deit_s_distilled
  from vit_jax_fix.train import loop, metrics
  c = deit_s_distilled.get_config("demo")
  c.data.data_dir = str(demo_data_dir)
  c.model.overrides.update(depth=1, embed_dim=32, num_heads=2)
  c.total_steps, c.batch_size, c.eval_batch_size, c.log_every_steps = 2, 16, 256, 1
  c.progress_bar, c.ema.decay = False, 0.0
  final = loop.train_and_evaluate(c, str(tmp_path / "run"))
  assert 0.0 <= final["eval/top1"] <= 1.0
  losses = [r["train/loss"] for r in metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
  assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_trainer_eval_graph_averages_the_heads_and_config_errors():
  """The trainer's eval step (and `python -m vit_jax_fix.evaluate`) merge the eval graph: the heads' mean."""
  import jax.numpy as jnp
  from vit_jax_fix.errors import ConfigError
  from vit_jax_fix.train import config as C, state as state_lib
  md = state_lib.ModelDef.create("deit_tiny_distilled_patch16_224", **dict(TINY, embed_dim=32, num_heads=2, depth=1))
  params, stats = md.init(0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  z_cls, z_dist = md.merge(params, stats, train=True)(x)
  np.testing.assert_allclose(md.merge(params, stats, train=False)(x), (z_cls + z_dist) / 2, atol=1e-6)
  c = C.base_config()
  c.distillation.type = "hard"
  with pytest.raises(ConfigError, match="distillation.teacher is empty"):
    C.validate(c)
  c.distillation.teacher = "deit_tiny_patch16_224"       # the zoo has its weights
  c.distillation.teacher_weights = ""
  C.validate(c)                                          # DeiT-Ti has released weights: fine
  c.distillation.teacher = "augvit_small"
  with pytest.raises(ConfigError, match="no released weights"):
    C.validate(c)
  c.distillation.type = "medium"
  with pytest.raises(ConfigError, match="distillation.type"):
    C.validate(c)
