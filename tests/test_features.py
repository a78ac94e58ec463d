"""Features for dense prediction: `forward_intermediates` (parity with timm's on the same weights for DeiT,
DeiT III and CaiT), `dynamic_img_size` (parity with timm's at a non-square size), EViT's kept tokens and their
grid positions, Shunted's stage maps, stop_early cutting a scanned segment, and the features_only wrapper."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core

import vit_jax_fix
from vit_jax_fix import errors
from vit_jax_fix.interop import from_torch_state_dict, testing
from vit_jax_fix.interop.timm_models import TimmUnsupported, timm_config
from vit_jax_fix.interop.torch_compat import import_timm
from vit_jax_fix.models import features, layout, registry

timm = import_timm()
import torch  # noqa: E402  (after import_timm, which prepares torchvision)

TINY = dict(img_size=32, patch_size=8, embed_dim=64, num_heads=4, num_classes=10, depth=3)
CASES = {
    "deit": ("deit_small_patch16_224", TINY),
    "deit3": ("deit_small_patch16_LS", TINY),                       # LayerScale, pos_embed over patches only
    "cait": ("cait_XXS24_224", dict(TINY, class_attn_depth=1)),     # no prefix token in the scanned stage
    "deit_distilled": ("deit_small_distilled_patch16_224", TINY),   # two prefix tokens
}
_PAIRS = {}


def timm_pair(case, dynamic=False):
  """(our model, timm's model) with the same (perturbed random) weights, through the timm interop layout."""
  key = (case, dynamic)
  if key not in _PAIRS:
    name, kw = CASES[case]
    tname, tkw = timm_config(name, **kw, **({"dynamic_img_size": True} if dynamic else {}))
    assert tkw.get("dynamic_img_size", False) == dynamic
    torch.manual_seed(0)
    tmodel = timm.create_model(tname, pretrained=False, **tkw)
    with torch.no_grad():  # timm inits LayerScale near 0 and biases at 0: move everything
      for p in tmodel.parameters():
        p.add_(0.2 * torch.randn_like(p))
    tmodel.eval()
    model = testing.random_model(name, seed=5, dynamic_img_size=dynamic, **kw)
    from_torch_state_dict(model, tmodel.state_dict(), layout="timm")
    model.eval()
    _PAIRS[key] = model, tmodel
  return _PAIRS[key]


def images(h=32, w=32, n=2, seed=1):
  x = np.random.default_rng(seed).normal(size=(n, h, w, 3)).astype(np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def run(model, x, fn):
  """fn(model, images) compiled (one program per test keeps the file fast), as numpy."""
  with jax.default_matmul_precision("highest"):
    return jax.tree.map(np.asarray, nnx.jit(fn)(model, jnp.asarray(x)))


def ours(model, x, *settings):
  """forward_intermediates under each of `settings` (dicts of its arguments), in one compiled program."""
  return run(model, x, lambda m, x: [m.forward_intermediates(x, **kw) for kw in settings])


def theirs(tmodel, xt, **kw):
  with torch.no_grad():
    return jax.tree.map(lambda t: t.numpy(), tmodel.forward_intermediates(xt, **kw),
                        is_leaf=lambda t: isinstance(t, torch.Tensor))


def assert_close(got, ref):
  got, ref = jax.tree.leaves(got), jax.tree.leaves(ref)
  assert len(got) == len(ref)
  for g, r in zip(got, ref):
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, atol=2e-4, rtol=0)


# (indices, norm, output_fmt, return_prefix_tokens, stop_early): int and list indices, both norms, both of
# timm's formats, prefix tokens, a cut before the last block.
SETTINGS = [(2, False, "NCHW", True, False), ([0, -1], True, "NLC", False, False), ([1], True, "NCHW", True, True)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_intermediates_match_timm(case):
  model, tmodel = timm_pair(case)
  x, xt = images()
  settings = []
  for indices, norm, fmt, prefix, stop in SETTINGS:
    settings.append(dict(indices=indices, norm=norm, output_fmt=fmt, stop_early=stop))
    if case != "cait":
      settings[-1]["return_prefix_tokens"] = prefix
  # NHWC (the default here) is NCHW transposed; intermediates_only returns the list alone.
  settings.append(dict(indices=[0, 2], intermediates_only=True))
  got = ours(model, x, *settings)
  for kw, g in zip(settings[:-1], got):
    assert_close(g, theirs(tmodel, xt, **kw))
  if case != "cait":                                          # (tokens, prefix tokens) pairs
    assert got[0][1][0][1].shape == (2, 2 if case == "deit_distilled" else 1, 64)
  nhwc = got[-1]
  assert [a.shape for a in nhwc] == [(2, 4, 4, 64)] * 2
  block2_nchw = got[0][1][1] if case == "cait" else got[0][1][1][0]
  np.testing.assert_allclose(nhwc[1], block2_nchw.transpose(0, 2, 3, 1), atol=1e-6)


def test_dynamic_img_size_matches_timm_at_a_non_square_size():
  for case in ("deit", "deit3"):   # pos_embed with and without the class token's slot
    model, tmodel = timm_pair(case, dynamic=True)
    x, xt = images(48, 64)         # a 6 x 8 grid from weights of a 4 x 4 one
    with torch.no_grad():
      ref = tmodel(xt).numpy()
    kw = dict(indices=[1], output_fmt="NCHW", return_prefix_tokens=True, stop_early=False)
    logits, got = run(model, x, lambda m, x: (m(x), m.forward_intermediates(x, **kw)))
    np.testing.assert_allclose(logits, ref, atol=2e-4, rtol=0)
    assert got[1][0][0].shape == (2, 64, 6, 8)
    assert_close(got, theirs(tmodel, xt, **kw))
  with pytest.raises(ValueError, match="not a multiple of patch_size 8"):
    model(jnp.zeros((1, 40, 36, 3)))
  with pytest.raises(TimmUnsupported, match="dynamic_img_size"):
    timm_config(CASES["cait"][0], dynamic_img_size=True, **CASES["cait"][1])
  fixed = testing.random_model(CASES["deit"][0], **TINY)
  with pytest.raises(ValueError, match="dynamic_img_size=True"):
    fixed(jnp.zeros((1, 48, 64, 3)))


def _poison_last_block(model):
  """NaN in every parameter of the last block: any output that ran it is NaN."""
  if model.param_layout == layout.STACKED:
    stack = model.block_stacks[-1]
    nnx.update(stack, jax.tree.map(lambda a: a.at[-1].set(jnp.nan), nnx.state(stack, nnx.Param)))
  else:
    blk = model.blocks[-1]
    nnx.update(blk, jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), nnx.state(blk, nnx.Param)))


def test_stop_early_runs_no_block_after_the_last_requested():
  # depth 4 in one scanned segment: indices [0, 2] cut it into parts [0], [1, 2] and leave block 3 unrun.
  x = images()[0]
  for param_layout in ("per_block", "stacked"):
    model = layout.with_param_layout(testing.random_model(CASES["deit3"][0], **dict(TINY, depth=4)), param_layout)
    model.eval()
    _poison_last_block(model)
    (final, maps), (late, _), (_, inter) = run(model, x, lambda m, x: (
        m.forward_intermediates(x, [0, 2]), m.forward_intermediates(x, [0, 2], stop_early=False),
        m(x, return_intermediates=True)))
    assert np.isfinite(final).all() and np.isnan(late).all()
    # The kept outputs are the parts' last carries: the full forward pass's block outputs.
    for i, m in zip((0, 2), maps):
      np.testing.assert_allclose(m.reshape(2, 16, 64), inter["tokens"][i][:, 1:], atol=1e-5)


def test_stop_early_in_training_advances_only_the_blocks_it_ran():
  # Dropout's RNG counters are state a block changes: a part of a stack writes back its own rows only.
  model = layout.with_param_layout(testing.random_model(CASES["deit"][0], **dict(TINY, depth=4, drop_rate=0.1)),
                                   "stacked")
  model.train()
  nnx.jit(lambda m, x: m.forward_intermediates(x, [0, 2]))(model, jnp.ones((2, 32, 32, 3)))
  counts = model.block_stacks[0].mlp.drop.rngs.count.get_value()
  np.testing.assert_array_equal(counts, [2, 2, 2, 0])     # two dropouts per MLP; block 3 never ran


def test_prune_intermediate_layers_keeps_the_outputs():
  model = layout.with_param_layout(testing.random_model(CASES["deit"][0], **dict(TINY, depth=4)), "stacked")
  model.eval()
  x = images()[0]
  fn = lambda m, x: m.forward_intermediates(x, [0, 1], intermediates_only=True)
  before = run(model, x, fn)
  assert model.prune_intermediate_layers([0, 1]) == [0, 1]
  assert model.depth == 2 and model.stack_sizes == (2,) and model.head is None
  assert_close(run(model, x, fn), before)


def test_evit_returns_kept_tokens_and_their_grid_positions():
  kw = dict(TINY, depth=4, keep_rate=0.5, keep_rate_blocks=(1, 2), fuse_token=True)
  model = testing.random_model("deit_small_patch16_shrink_base", seed=3, **kw)
  model.eval()
  x = jnp.asarray(images()[0])
  (_, inter), out = run(model, x, lambda m, x: (
      m(x, return_intermediates=True),
      m.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True, return_token_indices=True,
                              intermediates_only=True)))
  idx1, idx2 = (inter["reorg"][i]["idx"] for i in (1, 2))
  # 16 patches; after block 1: 8 kept + the fused one; after block 2: 5 of those 9 kept + a new fused one.
  assert [t.shape[1] for t, _, _ in out] == [16, 9, 6, 6]
  for i, (tokens, cls, where) in enumerate(out):
    np.testing.assert_allclose(tokens, inter["tokens"][i][:, 1:], atol=1e-5)
    np.testing.assert_allclose(cls, inter["tokens"][i][:, :1], atol=1e-5)
  np.testing.assert_array_equal(out[0][2], np.broadcast_to(np.arange(16), (2, 16)))
  after1 = np.concatenate([idx1, np.full((2, 1), -1)], axis=1)            # -1: the fused token
  np.testing.assert_array_equal(out[1][2], after1)
  after2 = np.concatenate([np.take_along_axis(after1, idx2, 1), np.full((2, 1), -1)], axis=1)
  np.testing.assert_array_equal(out[2][2], after2)
  np.testing.assert_array_equal(out[3][2], after2)
  # Grid formats: fine before the first reorganisation, an error after it.
  grid0 = nnx.eval_shape(lambda m, x: m.forward_intermediates(x, [0], intermediates_only=True), model, x)
  assert grid0[0].shape == (2, 4, 4, 64)
  with pytest.raises(ValueError, match="EViT token reorganisation of block 1.*output_fmt='NLC'"):
    model.forward_intermediates(x, [1])


SHUNTED = dict(num_classes=5, embed_dims=(16, 32, 32, 64), depths=(1, 2, 1, 1), num_heads=(2, 2, 2, 2))


def primitive_count(model, x, fn, name):
  """How many `name` primitives the traced program of fn(model, x) holds (nested jaxprs included)."""
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, x: fn(nnx.merge(graphdef, s), x))(state, x)

  def count(jp):
    n = 0
    for eqn in jp.eqns:
      n += eqn.primitive.name == name
      for sub in jax_core.jaxprs_in_params(eqn.params):
        n += count(sub)
    return n
  return count(jaxpr.jaxpr)


def test_shunted_stage_maps_equal_the_forward_pass():
  model = testing.random_model("shunted_t", **SHUNTED)
  model.eval()
  x = images(32, 64)[0]
  (_, inter), (final, maps), nchw = run(model, x, lambda m, x: (
      m(x, return_intermediates=True), m.forward_intermediates(x),
      m.forward_intermediates(x, [-1], output_fmt="NCHW", intermediates_only=True)))
  assert [m.shape for m in maps] == [(2, 8, 16, 16), (2, 4, 8, 32), (2, 2, 4, 32), (2, 1, 2, 64)]
  for m, s in zip(maps, inter["stages"]):
    np.testing.assert_allclose(m, s, atol=1e-6)
  np.testing.assert_array_equal(final, maps[-1])
  np.testing.assert_array_equal(nchw[0], maps[3].transpose(0, 3, 1, 2))
  # stop_early: the convolutions of stages 3 and 4 are not in the program.
  x = jnp.asarray(x)
  convs = [primitive_count(model, x, lambda m, x: m.forward_intermediates(x, [0, 1], stop_early=stop),
                           "conv_general_dilated") for stop in (True, False)]
  assert convs[0] < convs[1] and convs[1] == primitive_count(model, x, lambda m, x: m(x), "conv_general_dilated")


def test_features_only_gives_the_pyramid_and_its_feature_info():
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  pyramid = nnx.eval_shape(lambda: vit_jax_fix.create_model("shunted_t", features_only=True, out_indices=(1, 2, 3),
                                                            **SHUNTED))
  assert pyramid.channels() == [32, 32, 64] and pyramid.reductions() == [8, 16, 32]
  maps = nnx.eval_shape(lambda m, x: m(x), pyramid, x)
  assert [m.shape for m in maps] == [(1, 8, 8, 32), (1, 4, 4, 32), (1, 2, 2, 64)]
  vit = nnx.eval_shape(lambda: vit_jax_fix.create_model("deit_small_patch16_224", features_only=True,
                                                        **dict(TINY, dynamic_img_size=True)))
  assert vit.feature_info == [dict(num_chs=64, reduction=8, module=f"blocks.{i}") for i in range(3)]
  maps = nnx.eval_shape(lambda m, x: m(x), vit, jax.ShapeDtypeStruct((1, 48, 64, 3), jnp.float32))
  assert [m.shape for m in maps] == [(1, 6, 8, 64)] * 3
  with pytest.raises(ValueError, match="out of range for 3 blocks"):
    features.take_indices(3, [3])
  with pytest.raises(errors.ConfigError, match="features_only"):
    vit_jax_fix.create_model("deit_small_patch16_224", out_indices=[1])
