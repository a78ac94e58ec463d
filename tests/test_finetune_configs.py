"""The fine-tuning configs in their :demo form (tiny widths) from a tiny source model exported as a PyTorch file
at 28 px: the trainer's set-up, init_from step and a first update for DeiT III at a larger grid (pos_embed resized), EViT at a
larger grid from DeiT weights and transfer with a new head (another class count) and layer decay; a real
2-step run of the linear probe, whose backbone comes out bit-identical to the source."""
import jax
import numpy as np
import pytest

from vit_jax_fix.interop import testing
from vit_jax_fix.interop.checkpoint_io import save_torch
from vit_jax_fix.models import layout
from vit_jax_fix.train import checkpoint as ckpt
from vit_jax_fix.train import loop
from vit_jax_fix.train import sharding as shard_lib

TINY = dict(embed_dim=32, depth=2, num_heads=2, patch_size=7)


def _source(tmp_path, name: str, num_classes: int = 10):
  """A random tiny model at 28 px (the from-scratch demos' size), exported with its official keys."""
  model = testing.random_model(name, img_size=28, num_classes=num_classes, **TINY)
  path = str(tmp_path / f"{name}_{num_classes}.safetensors")
  save_torch(model, path, name=name, overrides=dict(TINY, img_size=28, num_classes=num_classes), layout="official")
  return path, ckpt.model_trees(layout.with_param_layout(model, layout.PER_BLOCK))["params"]


def _config(module: str, data_dir, source: str, **overrides):
  import importlib
  c = importlib.import_module(f"configs.{module}").get_config("demo")
  c.model.overrides.update(TINY, **overrides)
  c.init_from.path = source
  c.data.data_dir = str(data_dir)
  c.total_steps, c.eval_every_steps, c.eval_batch_size, c.batch_size = 2, 0, 500, 32
  c.progress_bar = False
  return c


def _mesh():
  return shard_lib.make_mesh(1, 1, devices=jax.devices()[:1])


@pytest.mark.parametrize("module,source,overrides,pos_embed,head", [
    ("deit3_s_384", ("deit_small_patch16_LS", 10), {}, (1, 36, 32), (32, 10)),   # 4x4 -> 6x6, no class slot
    ("evit_s_272", ("deit_small_patch16_224", 10), dict(keep_rate_blocks=(1,)), (1, 37, 32), (32, 10)),
    ("transfer_cifar10", ("deit_small_patch16_224", 7), {}, (1, 17, 32), (32, 10)),   # a new head
])
def test_finetune_demo_initialises_from_a_smaller_model(tmp_path, demo_data_dir, module, source, overrides,
                                                        pos_embed, head):
  """The demo's trainer set-up (model, optimizer with the config's transfer keys), its init_from step and one
  training update."""
  path, src = _source(tmp_path, *source)
  setup = loop.Setup(_config(module, demo_data_dir, path, **overrides), _mesh())
  state = loop._finetune_init(setup, setup.init_state())
  params = setup.model_def.per_block(jax.device_get(state["params"]))
  assert params["pos_embed"].shape == pos_embed and params["head"]["kernel"].shape == head
  np.testing.assert_array_equal(params["blocks"][1]["mlp"]["fc2"]["kernel"], src["blocks"][1]["mlp"]["fc2"]["kernel"])
  if source[1] == 10:
    np.testing.assert_array_equal(params["head"]["kernel"], src["head"]["kernel"])
  # and it trains: one update of the demo's compiled step (its resolution, keep rates, layer decay) from there
  state, metrics = loop._train_step(setup, state, next(iter(setup.train_batches(0))), 0)
  assert np.isfinite(float(metrics["train/loss"]))
  moved = setup.model_def.per_block(jax.device_get(state["params"]))["blocks"][1]["mlp"]["fc2"]["kernel"]
  assert not np.array_equal(moved, src["blocks"][1]["mlp"]["fc2"]["kernel"])


def test_linear_probe_demo_trains_the_head_only(tmp_path, demo_data_dir):
  """A real 2-step run of the linear-probe demo: the backbone comes out bit-identical to the source."""
  source, src = _source(tmp_path, "deit_small_patch16_224")
  workdir = str(tmp_path / "probe")
  final = loop.train_and_evaluate(_config("linear_probe_cifar10", demo_data_dir, source), workdir, mesh=_mesh())
  assert 0.0 <= final["eval/top1"] <= 1.0
  params = ckpt.load_state_dicts(workdir)[2]
  for key in ("pos_embed", "cls_token"):
    assert params[key].tobytes() == np.asarray(src[key]).tobytes()
  for i in (0, 1):
    a, b = params["blocks"][i]["mlp"]["fc1"]["kernel"], np.asarray(src["blocks"][i]["mlp"]["fc1"]["kernel"])
    assert a.tobytes() == b.tobytes()
  assert not np.array_equal(params["head"]["kernel"], np.asarray(src["head"]["kernel"]))
