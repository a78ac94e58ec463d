"""The stacked parameter layout of scanned blocks (`param_layout='stacked'`, the trainer's layout) against the
per-block layout: same function, same gradients, same training, exact conversions, and a train-step program
whose size does not grow with depth (the reason it exists: compile time, issue #9)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vit_jax_fix.interop import to_torch_state_dict, from_torch_state_dict
from vit_jax_fix.models import keep_rate as keep_rate_lib
from vit_jax_fix.models import layout, registry, vit
from vit_jax_fix.models.registry import create_model
from vit_jax_fix.train import checkpoint as ckpt
from vit_jax_fix.train import config as C
from vit_jax_fix.train import optim
from vit_jax_fix.train import sharding as S
from vit_jax_fix.train import state as state_lib
from vit_jax_fix.train import steps as steps_lib

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=5)
CASES = {
    "deit": ("deit_small_patch16_224", dict(depth=4, drop_path_rate=0.1)),
    # reorganising blocks stay alone: stacks (1, 1, 1, 1, 2) around blocks 1 and 3
    "evit": ("deit_small_patch16_shrink_base", dict(depth=6, keep_rate=0.5, keep_rate_blocks=(1, 3),
                                                    fuse_token=True)),
    "deepvit_bn": ("deepvit_S", dict(depth=7)),          # re-attention in the last 5: BatchNorm statistics
    "augvit": ("augvit_small_circulant2", dict(depth=3)),
    "cait": ("cait_XXS24_224", dict(depth=3, class_attn_depth=1)),
}
X = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))


def _pair(case, **kw):
  name, extra = CASES[case]
  kw = dict(SMALL, **extra, **kw)
  return create_model(name, **kw), create_model(name, param_layout="stacked", **kw)


def _pure(model, *filters):
  return nnx.to_pure_dict(nnx.state(model, *(filters or (nnx.Not(nnx.RngState),))))


def _assert_trees_equal(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if tol:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_init_same_function(case):
  per_block, stacked = _pair(case)
  assert stacked.param_layout == "stacked" and sum(stacked.stack_sizes) == stacked.depth
  assert len(stacked.stack_sizes) < stacked.depth                # something really is stacked
  # Same seed, same values: stacking the per-block model's tree gives the stacked model's tree.
  _assert_trees_equal(layout.stack_block_tree(_pure(per_block), stacked.stack_sizes), _pure(stacked))
  _assert_trees_equal(layout.unstack_block_tree(_pure(stacked), stacked.stack_sizes), _pure(per_block))
  _assert_trees_equal(_pure(layout.with_param_layout(stacked, "per_block")), _pure(per_block))
  _assert_trees_equal(_pure(layout.with_param_layout(per_block, "stacked")), _pure(stacked))
  assert vit.with_param_layout is layout.with_param_layout          # the public name users import
  for m in (per_block, stacked):
    m.train()      # train-mode forward: DeepViT's BatchNorm uses and updates batch statistics
  la, ia = per_block(X, return_intermediates=True)
  lb, ib = stacked(X, return_intermediates=True)
  np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-6)
  for key in ("tokens", "attn"):
    assert len(ia[key]) == len(ib[key]) == per_block.depth
    for u, v in zip(ia[key], ib[key]):
      np.testing.assert_allclose(v, u, rtol=1e-5, atol=1e-6)
  for u, v in zip(ia["reorg"], ib["reorg"]):
    assert (u is None) == (v is None)
    if u is not None:
      np.testing.assert_array_equal(u["idx"], v["idx"])
  # State written back by the blocks (BatchNorm statistics) lands in the stack as in the blocks.
  _assert_trees_equal(_pure(layout.with_param_layout(stacked, "per_block"), nnx.BatchStat),
                      _pure(per_block, nnx.BatchStat), rtol=1e-5, atol=1e-6)
  if case == "deepvit_bn":
    assert jax.tree.leaves(_pure(stacked, nnx.BatchStat))


@pytest.mark.parametrize("case,remat", [("deit", False), ("deit", True), ("deit", "dots"), ("evit", "dots")])
def test_same_gradients(case, remat):
  per_block, stacked = _pair(case, remat=remat)

  def grads(model):
    def loss(m):
      return jnp.sum(m(X) ** 2)
    return nnx.grad(loss)(model)
  g_pb = nnx.to_pure_dict(grads(per_block))
  g_st = nnx.to_pure_dict(grads(stacked))
  _assert_trees_equal(layout.stack_block_tree(g_pb, stacked.stack_sizes), g_st, rtol=2e-5, atol=1e-6)


def test_interop_reads_and_writes_stacked_models():
  per_block, stacked = _pair("deit")
  sd = to_torch_state_dict(per_block)
  got = to_torch_state_dict(stacked)
  assert sorted(got) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(got[k], sd[k])
  # Loading into a stacked model in place: different weights in, those weights out.
  other = create_model(CASES["deit"][0], seed=3, **dict(SMALL, **CASES["deit"][1]))
  sd_other = to_torch_state_dict(other)
  assert from_torch_state_dict(stacked, sd_other) is stacked
  assert stacked.param_layout == "stacked"
  for k, v in to_torch_state_dict(stacked).items():
    np.testing.assert_array_equal(v, sd_other[k])
  stacked.eval(), other.eval()                           # no drop-path: their RNG streams differ
  np.testing.assert_allclose(stacked(X), other(X), rtol=1e-5, atol=1e-6)


def test_keep_rate_of_a_block_inside_a_stack_is_refused():
  _, stacked = _pair("deit")
  with pytest.raises(ValueError, match="stored stacked with their neighbours"):
    keep_rate_lib.set_keep_rate(stacked, 0.7, blocks=(1,))
  _, evit = _pair("evit")
  keep_rate_lib.set_keep_rate(evit, 0.7)                 # configured blocks sit alone: allowed
  assert [b.keep_rate for b in evit.block_list()] == [1.0, 0.7, 1.0, 0.7, 1.0, 1.0]


def test_stacked_leaves_never_shard_the_block_axis():
  tree = {"block_stacks": {0: {"w": jax.ShapeDtypeStruct((16, 4, 4), jnp.float32)}},
          "blocks": {0: {"w": jax.ShapeDtypeStruct((16, 4, 4), jnp.float32)}}}
  specs = S.partition_specs(tree, strategy="fsdp", fsdp_size=2, min_size=16)
  assert specs["block_stacks"][0]["w"] == jax.P(None, "fsdp", None)
  assert specs["blocks"][0]["w"] == jax.P("fsdp", None, None)     # the same shape outside a stack


def _trained(layout: str, opt: str, steps: int = 3):
  c = C.base_config()
  c.optimizer.name = opt
  c.optimizer.clip_grad_norm = 1.0
  md = state_lib.ModelDef.create("deit_small_patch16_224", param_layout=layout, **dict(SMALL, depth=3))
  assert md.param_layout == layout
  tx, lr = optim.make_optimizer(c, md.abstract_params(), 10, 5)
  state = jax.jit(lambda: state_lib.init_train_state(md, tx, 0, ema=True))()
  mix = dict(num_classes=5, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0, label_smoothing=0.1)
  step = jax.jit(steps_lib.make_train_step(md, tx, loss="softmax_ce", mix_kwargs=mix, ema_decay=0.9,
                                           lr_schedule=lr))
  rng = np.random.RandomState(0)
  for _ in range(steps):
    batch = {"image": rng.randn(8, 32, 32, 3).astype(np.float32), "label": rng.randint(0, 5, 8).astype(np.int32)}
    state, _ = step(state, batch)
  return md, state


@pytest.mark.parametrize("opt", ["adamw", "lamb"])
def test_training_is_layout_independent(opt):
  """AdamW and LAMB (whose trust ratio is per parameter: per block inside a stack) update the stacked
  layout exactly as the per-block one; the EMA too."""
  md_pb, pb = _trained("per_block", opt)
  md_st, st = _trained("stacked", opt)
  assert "block_stacks" in st["params"] and "blocks" in pb["params"]
  for key in ("params", ):
    _assert_trees_equal(md_st.per_block(jax.device_get(st[key])), jax.device_get(pb[key]), rtol=2e-5, atol=2e-6)
  _assert_trees_equal(md_st.per_block(jax.device_get(st["ema"]["params"])), jax.device_get(pb["ema"]["params"]),
                      rtol=2e-5, atol=2e-6)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), pb["params"],
                                       jax.device_get(md_pb.init(0)[0])))
  assert max(moved) > 1e-4                                     # training did move the weights


def _program_size(layout: str, depth: int) -> int:
  """Operations in the lowered (not compiled) train step: grad + AdamW + EMA."""
  c = C.base_config()
  md = state_lib.ModelDef.create("deit_small_patch16_224", param_layout=layout, **dict(SMALL, depth=depth))
  tx, lr = optim.make_optimizer(c, md.abstract_params(), 10, 5)
  state = jax.eval_shape(lambda: state_lib.init_train_state(md, tx, 0, ema=True))
  step = steps_lib.make_train_step(md, tx, loss="softmax_ce", mix_kwargs=dict(num_classes=5, prob=0.0),
                                   ema_decay=0.9, lr_schedule=lr)
  batch = {"image": jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32),
           "label": jax.ShapeDtypeStruct((8,), jnp.int32)}
  text = jax.jit(step).lower(state, batch).as_text()
  return len(re.findall(r"^\s*(%\S+ = )?\"?\w+\.", text, flags=re.M))


def test_train_step_program_does_not_grow_with_depth():
  stacked = {d: _program_size("stacked", d) for d in (2, 8)}
  per_block = {d: _program_size("per_block", d) for d in (2, 8)}
  assert stacked[8] <= stacked[2] * 1.02, stacked
  assert per_block[8] > per_block[2] * 1.5, per_block         # what the per-block layout costs


def test_checkpoint_of_the_other_layout_names_the_override(tmp_path):
  md_pb = state_lib.ModelDef.create("deit_small_patch16_224", param_layout="per_block", **dict(SMALL, depth=2))
  md_st = state_lib.ModelDef.create("deit_small_patch16_224", **dict(SMALL, depth=2))
  tx = optax.adamw(1e-3)
  saved = jax.jit(lambda: state_lib.init_train_state(md_pb, tx, 0, ema=False))()
  mngr = ckpt.manager(str(tmp_path))
  ckpt.save(mngr, 1, saved, {"model_name": md_pb.name, "model_kwargs": md_pb.kwargs, "has_ema": False}, force=True)
  mngr.wait_until_finished()
  mngr.close()
  abstract = jax.eval_shape(lambda: state_lib.init_train_state(md_st, tx, 0, ema=False))
  with pytest.raises(ckpt.CheckpointMismatchError, match="param_layout=per_block"):
    ckpt.restore_latest_good(str(tmp_path), lambda: ckpt.manager(str(tmp_path)), abstract)
  # Readers of checkpoints (export, init_from, diagnostics) get the per-block trees either way.
  _, _, params, _ = ckpt.load_state_dicts(str(tmp_path))
  _assert_trees_equal(params, jax.device_get(saved["params"]))
  model = ckpt.load_model(str(tmp_path))
  assert model.param_layout == "per_block"


def test_one_predicate_names_the_leaves_of_stacked_blocks():
  """Optimizer, sharding and checkpoint messages all ask `layout.is_stacked_path`, whatever the path's form."""
  assert layout.is_stacked_path("params/block_stacks/0/attn/qkv/kernel")
  assert layout.is_stacked_path("1/0/mu/block_stacks/2/norm1/scale")          # optimizer state nests it deeper
  assert layout.is_stacked_path(("block_stacks", 0, "attn", "qkv", "kernel"))  # an nnx path
  assert not layout.is_stacked_path("params/blocks/0/attn/qkv/kernel")
  assert not layout.is_stacked_path("params/my_block_stacks/0/w")
  _, stacked = _pair("deit")
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(_pure(stacked))[0]]
  assert {layout.is_stacked_path(p) for p in paths} == {True, False}             # jax key paths
  assert layout.layout_of_paths(["params/blocks/0/w", "params/block_stacks/0/w"]) == "stacked"
  assert layout.layout_of_paths(["params/blocks/0/w"]) == "per_block"


def test_which_families_have_the_option():
  for name in registry.list_models():
    builder = registry.get_spec(name).builder
    assert layout.has_option(builder) == ("param_layout" in registry.valid_overrides(builder)), name
  vit_builder, shunted_builder = (registry.get_spec(n).builder for n in ("deit_small_patch16_224", "shunted_t"))
  assert layout.resolve(vit_builder, {}) == "stacked"
  assert layout.resolve(vit_builder, {"scan_blocks": False}) == "per_block"
  assert layout.resolve(vit_builder, {"param_layout": "per_block"}, "stacked") == "per_block"   # the override wins
  assert layout.resolve(shunted_builder, {}) is None
  shunted = create_model("shunted_t", img_size=32, num_classes=5)
  assert layout.with_param_layout(shunted, "stacked") is shunted and layout.layout_of(shunted) is None
  with pytest.raises(ValueError, match="param_layout must be one of"):
    layout.with_param_layout(shunted, "rows")


def test_tree_conversion_leaves_a_tree_already_in_the_layout_alone():
  per_block, stacked = _pair("evit")
  tree_pb, tree_st = _pure(per_block), _pure(stacked)
  sizes = stacked.stack_sizes
  assert sizes == (1, 1, 1, 1, 2) and per_block.stack_sizes == ()
  assert layout.tree_in_layout(tree_st, "stacked", sizes) is tree_st
  assert layout.tree_in_layout(tree_pb, "per_block", sizes) is tree_pb
  assert layout.tree_in_layout(tree_pb, None, sizes) is tree_pb                 # families without the option
  _assert_trees_equal(layout.tree_in_layout(tree_pb, "stacked", sizes), tree_st)
  _assert_trees_equal(layout.tree_in_layout(tree_st, "per_block", sizes), tree_pb)
  with pytest.raises(ValueError, match="needs scan_blocks=True"):
    create_model("deit_small_patch16_224", param_layout="stacked", scan_blocks=False, **SMALL)
