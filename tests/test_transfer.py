"""Transfer optimisation (train/transfer.py): layer-wise lr decay factors equal timm's param_groups_layer_decay
lr_scale for DeiT, DeiT III and CaiT (class-attention blocks included), in the trainer's stacked layout; freezing
by regex keeps parameters and their EMA bit-identical through training steps with weight decay, clipping and
layer decay, while the rest trains."""
import itertools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from vit_jax_fix.errors import ConfigError
from vit_jax_fix.interop import skeleton, to_torch_state_dict
from vit_jax_fix.interop.timm_models import create_timm_model
from vit_jax_fix.interop.torch_compat import import_timm
from vit_jax_fix.train import config as C
from vit_jax_fix.train import optim
from vit_jax_fix.train import state as state_lib
from vit_jax_fix.train import steps as steps_lib
from vit_jax_fix.train import transfer

timm = import_timm()
from timm.optim import param_groups_layer_decay  # noqa: E402  (after import_timm)

TINY = dict(img_size=32, embed_dim=32, num_heads=2, num_classes=10, patch_size=8)
CASES = {
    "deit": ("deit_small_patch16_224", dict(TINY, depth=3)),
    "deit3": ("deit_small_patch16_LS", dict(TINY, depth=3)),
    "cait": ("cait_XXS24_224", dict(TINY, depth=3, class_attn_depth=2)),
}
DECAY = 0.75


def _per_block(values: dict, params) -> dict:
  """{'block_stacks/j/...': vector} -> {'blocks/i/...': value} (other keys as they are)."""
  st = transfer._Structure(params)
  out = {}
  for name, v in values.items():
    names = name.split("/")
    rows = len(v) if np.ndim(v) else None
    for i, per_block in enumerate(st.per_block_names(names, rows)):
      out[per_block] = v[i] if rows else v
  return out


def _torch_names(name: str, kw: dict) -> dict:
  """{our per-block path: timm parameter name}, through the interop export (layout='timm'): every parameter
  is filled with its own index, and the exported arrays say which torch key holds which."""
  counter = itertools.count(1)
  model = skeleton.filled(name, lambda leaf, shape, dtype: np.full(shape, float(next(counter))), **kw)
  ours = {"/".join(str(k.key) for k in path): float(np.ravel(x)[0])
          for path, x in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]}
  theirs = {float(np.ravel(v)[0]): k for k, v in to_torch_state_dict(model, layout="timm").items()}
  return {path: theirs[i] for path, i in ours.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_decay_factors_equal_timm(case):
  name, kw = CASES[case]
  md = state_lib.ModelDef.create(name, **kw)
  assert md.param_layout == "stacked"
  stacked = md.abstract_params()
  ours = _per_block(transfer.layer_scales(stacked, DECAY), stacked)
  # The per-block layout gives the same factors.
  assert ours == pytest.approx(transfer.layer_scales(md.per_block(stacked), DECAY))

  tmodel = create_timm_model(name, **kw)
  groups = param_groups_layer_decay(tmodel, weight_decay=0.05, layer_decay=DECAY,
                                    no_weight_decay_list=tmodel.no_weight_decay())
  by_param = {id(p): g for g in groups for p in g["params"]}
  timm_scale = {n: by_param[id(p)]["lr_scale"] for n, p in tmodel.named_parameters()}
  timm_wd = {n: by_param[id(p)]["weight_decay"] > 0 for n, p in tmodel.named_parameters()}
  names = _torch_names(name, kw)
  assert sorted(names.values()) == sorted(timm_scale)
  got = {names[p]: s for p, s in ours.items()}
  assert got == pytest.approx(timm_scale, rel=1e-6)
  assert len(set(timm_scale.values())) == kw["depth"] + 2       # stem, blocks, head: all distinct
  # The weight-decay exemptions agree with timm's no-decay groups too.
  mask = optim.decay_mask(md.per_block(stacked))
  flat = {"/".join(str(k.key) for k in p): bool(m) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert {names[p]: m for p, m in flat.items()} == timm_wd


def test_layer_decay_scales_the_optimizer_update():
  """make_optimizer's update with layer_decay is the plain update times the factor (a stacked leaf per block);
  a params tree of the model's names and the stacked layout's shapes (3 blocks), no model needed."""
  rng = np.random.default_rng(0)
  leaf = lambda *shape: rng.normal(size=shape).astype(np.float32)
  params = {"pos_embed": leaf(1, 5, 4), "block_stacks": {0: {"attn": {"qkv": {"kernel": leaf(3, 4, 12)}}}},
            "norm": {"scale": leaf(4)}, "head": {"kernel": leaf(4, 10)}}
  grads = jax.tree.map(lambda p: leaf(*p.shape), params)

  def update(d):
    c = C.base_config()
    c.optimizer.layer_decay = d
    tx, _ = optim.make_optimizer(c, params, 10, 5)
    return tx.update(grads, tx.init(params), params)[0]
  plain, decayed = jax.jit(lambda: (update(0.0), update(0.5)))()
  qkv = lambda u: np.asarray(u["block_stacks"][0]["attn"]["qkv"]["kernel"])
  np.testing.assert_allclose(qkv(decayed), qkv(plain) * (0.5 ** np.array([3, 2, 1]))[:, None, None], rtol=1e-6)
  np.testing.assert_allclose(decayed["pos_embed"], plain["pos_embed"] * 0.5 ** 4, rtol=1e-6)
  np.testing.assert_allclose(decayed["norm"]["scale"], plain["norm"]["scale"] * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(decayed["head"]["kernel"], plain["head"]["kernel"])


def test_shunted_layer_ids_follow_stages():
  md = state_lib.ModelDef.create("shunted_t", img_size=32, embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1),
                                 num_heads=(2, 2, 4, 8), num_classes=10)
  ids = transfer.layer_ids(md.abstract_params())
  top = {k.split("/")[0] + ("/" + k.split("/")[1] if k.startswith("block") else ""): v for k, v in ids.items()}
  assert top["patch_embed1"] == 0 and top["block1/0"] == 1 and top["norm1"] == 1
  assert top["patch_embed3"] == 3 == top["block3/0"] and top["block3/1"] == top["norm3"] == 4
  assert top["block4/0"] == top["norm4"] == 5 and top["head"] == 6


def test_freeze_keeps_parameters_and_ema_bit_identical():
  """Stem + block 0 frozen (block 0 shares a stacked leaf with block 1: per-row freezing; the stem leaves go to
  set_to_zero), with weight decay, clipping, layer decay and EMA: 3 steps leave them and their EMA exactly as
  they were; block 1 and the head train."""
  c = C.base_config()
  c.optimizer.freeze = r"(patch_embed|cls_token|pos_embed)(/.*)?|blocks/0/.*"
  c.optimizer.layer_decay = 0.8
  c.optimizer.clip_grad_norm = 1.0
  c.optimizer.lr_batch_scale = 0
  c.optimizer.lr = 1e-2
  md = state_lib.ModelDef.create("deit_small_patch16_224", **dict(TINY, depth=2, img_size=16, patch_size=8))
  frozen = transfer.frozen_map(md.abstract_params(), c.optimizer.freeze)
  assert frozen["pos_embed"] is True and frozen["head/kernel"] is False
  np.testing.assert_array_equal(frozen["block_stacks/0/attn/qkv/kernel"], [True, False])
  tx, lr = optim.make_optimizer(c, md.abstract_params(), 10, 5)
  state = jax.jit(lambda: state_lib.init_train_state(md, tx, 0, ema=True))()
  before = jax.tree.map(np.array, state)
  step = jax.jit(steps_lib.make_train_step(md, tx, loss="softmax_ce", mix_kwargs=dict(num_classes=10, prob=0.0),
                                           ema_decay=0.9, lr_schedule=lr, frozen=frozen))
  rng = np.random.default_rng(0)
  for _ in range(3):
    batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 10, 8).astype(np.int32)}
    state, _ = step(state, batch)
  for tree in ("params",):
    for src in (state[tree], state["ema"]["params"]):
      after, old = jax.tree.map(np.asarray, src), before[tree]
      for key in ("pos_embed", "cls_token"):
        assert after[key].tobytes() == old[key].tobytes()
      assert after["patch_embed"]["proj"]["kernel"].tobytes() == old["patch_embed"]["proj"]["kernel"].tobytes()
      qkv, qkv0 = after["block_stacks"][0]["attn"]["qkv"]["kernel"], old["block_stacks"][0]["attn"]["qkv"]["kernel"]
      assert qkv[0].tobytes() == qkv0[0].tobytes()                  # block 0 frozen
      assert not np.array_equal(qkv[1], qkv0[1])                    # block 1 trains
      assert not np.array_equal(after["head"]["kernel"], old["head"]["kernel"])


def test_freeze_regex_errors():
  params = state_lib.ModelDef.create("deit_small_patch16_224", **dict(TINY, depth=2)).abstract_params()
  for regex, msg in (("head/(", "not a regular expression"), ("nothing", "matches no parameter"),
                     (".*", "matches every parameter")):
    with pytest.raises(ConfigError, match=msg):
      transfer.frozen_map(params, regex)
  c = C.base_config()
  c.optimizer.layer_decay = 1.5
  with pytest.raises(ConfigError, match="layer_decay"):
    C.validate(c)
  assert isinstance(transfer.wrap(optax.sgd(1.0), params), optax.GradientTransformation)
