"""Shunted Transformer: exact sizes of the registered names, official-argument translation, any input size,
head-group attention maps, train/eval modes. Parity with the official code is in test_golden_parity.py.

Models under test are built with `nnx.eval_shape` and filled from NumPy (no per-op JAX compilation), and
every forward runs through one `nnx.jit`, which keeps the file fast on small CPUs."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vit_jax_fix.interop import torch_keys
from vit_jax_fix.interop.official import official_overrides
from vit_jax_fix.models import layers, shunted
from vit_jax_fix.models.registry import count_params, create_model, get_spec
from tests.testdata import STATE_DICTS

TINY = dict(embed_dims=(64, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 4), mlp_ratios=(2, 2, 2, 2),
            num_classes=7)


def numpy_init(model, seed=0):
  """Fill an abstract (eval_shape) model with fan-in scaled random values; BN variances positive."""
  rng = np.random.default_rng(seed)
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Variable):
      continue
    raw = node.get_raw_value()
    shape, dtype = raw.shape, raw.dtype
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
      node.set_value(jax.random.key(int(rng.integers(1 << 30))))
    elif not jnp.issubdtype(dtype, jnp.floating):
      node.set_value(np.zeros(shape, dtype))
    else:
      if path[-1] == "var":
        a = np.exp(0.2 * rng.standard_normal(shape))
      elif path[-1] == "scale":
        a = 1.0 + 0.1 * rng.standard_normal(shape)
      elif len(shape) >= 2:
        a = rng.standard_normal(shape) / math.sqrt(np.prod(shape[:-1]))
      else:
        a = 0.1 * rng.standard_normal(shape)
      node.set_value(jnp.asarray(a.astype(dtype)))
  return model


@functools.lru_cache(maxsize=None)
def abstract(name):
  # nnx.eval_shape of a large model is slow-ish in this flax/jax pair (every RNG draw inspects the growing
  # trace), so each registered name is traced once per session.
  return nnx.eval_shape(lambda: create_model(name))


def tiny(**kw):
  return numpy_init(nnx.eval_shape(lambda: create_model("shunted_t", **{**TINY, **kw})))


def read_tsv(name):
  keys, counts = {}, {}
  for line in (STATE_DICTS / f"{name}.tsv").read_text().splitlines():
    if not line.strip():
      continue
    parts = line.split("\t")
    if line.startswith("#"):
      counts[parts[0][1:].strip()] = int(parts[1])
    else:
      keys[parts[0]] = tuple(int(s) for s in parts[1].strip("[]").split(",") if s.strip())
  return keys, counts


@pytest.mark.parametrize("name,params,entries", [("shunted_t", 11_553_576, 260), ("shunted_s", 22_401_256, 596),
                                                  ("shunted_b", 39_614_376, 1010)])
def test_registered_sizes_match_official(name, params, entries):
  model = abstract(name)
  keys, counts = read_tsv(name)
  assert counts["params"] == params
  assert count_params(model) == params
  got = torch_keys(model)
  assert len(got) == len(keys) == entries
  assert got == keys   # every official key with its PyTorch shape, BatchNorm buffers included
  spec = get_spec(name)
  assert spec.family == "shunted" and spec.crop_pct == 0.875 and spec.paper_top1 is not None


def test_stem_indices_follow_num_conv():
  # T: conv.0, BN conv.1, 2x2 conv.3; B: 3x3 convs conv.3 / conv.6, BNs conv.1/4/7, 2x2 conv.9 (shunted.md 6).
  keys_b = torch_keys(abstract("shunted_b"))
  stem = sorted(k for k in keys_b if k.startswith("patch_embed1.conv."))
  assert {k.split(".")[2] for k in stem} == {"0", "1", "3", "4", "6", "7", "9"}
  assert keys_b["patch_embed1.conv.9.weight"] == (64, 64, 2, 2)
  assert keys_b["patch_embed1.conv.6.weight"] == (64, 64, 3, 3)
  assert keys_b["block3.23.mlp.dwconv.dwconv.weight"] == (1024, 1, 3, 3)
  assert keys_b["block4.1.attn.local_conv.weight"] == (512, 1, 3, 3)


def test_official_overrides():
  golden_kwargs = dict(img_size=64, patch_size=4, num_classes=10, embed_dims=[64, 32, 48, 64],
                       num_heads=[2, 2, 2, 4], mlp_ratios=[4, 4, 2, 2], qkv_bias=True,
                       norm_layer={"$partial": "torch.nn.LayerNorm", "kwargs": {"eps": 1e-06}},
                       depths=[1, 1, 2, 1], sr_ratios=[8, 4, 2, 1], num_conv=1)
  out = official_overrides("shunted_s", **golden_kwargs)
  assert out["norm_eps"] == 1e-6 and out["num_conv"] == 1 and out["depths"] == [1, 1, 2, 1]
  assert out["embed_dims"] == [64, 32, 48, 64] and out["num_classes"] == 10 and out["qkv_bias"] is True
  # Arguments not given take the official *class* defaults (not the registered name's).
  bare = official_overrides("shunted_t")
  assert bare["qkv_bias"] is False and bare["norm_eps"] == 1e-5 and bare["num_heads"] == [1, 2, 4, 8]
  assert bare["depths"] == [3, 4, 6, 3] and bare["mlp_ratios"] == [4, 4, 4, 4] and bare["num_conv"] == 0
  assert official_overrides("shunted_t", num_stages=3)["depths"] == [3, 4, 6]
  with pytest.raises(TypeError, match="embed_dim"):
    official_overrides("shunted_t", embed_dim=64)
  with pytest.raises(ValueError, match="norm_layer"):
    official_overrides("shunted_t", norm_layer={"$partial": "torch.nn.BatchNorm2d"})
  assert official_overrides("shunted_t", norm_layer={"$module_attr": "torch.nn.LayerNorm"})["norm_eps"] == 1e-5
  # The official constructor of shunted_t with its own arguments builds exactly the registered shunted_t.
  official_t = dict(patch_size=4, embed_dims=[64, 128, 256, 512], num_heads=[2, 4, 8, 16], mlp_ratios=[8, 8, 4, 4],
                    qkv_bias=True, norm_layer={"$partial": "torch.nn.LayerNorm", "kwargs": {"eps": 1e-6}},
                    depths=[1, 2, 4, 1], sr_ratios=[8, 4, 2, 1], num_conv=0)
  m = nnx.eval_shape(lambda: create_model("shunted_t", **official_overrides("shunted_t", **official_t)))
  assert count_params(m) == 11_553_576


def test_convs_take_the_official_init():
  """layers.conv with Shunted's init: kernel N(0, sqrt(2 / fan_out)), fan_out = k^2 C_out / groups; bias zero."""
  attn = shunted.ShuntedAttention(64, 2, 8, rngs=nnx.Rngs(0))
  for conv, fan_out in ((attn.sr1, 8 * 8 * 64), (attn.sr2, 4 * 4 * 64), (attn.local_conv1, 3 * 3 * 32 // 32)):
    kernel = np.asarray(conv.kernel[...])
    assert abs(kernel.std() / math.sqrt(2.0 / fan_out) - 1) < 0.1, conv
    assert not np.asarray(conv.bias[...]).any()


def test_invalid_configurations():
  with pytest.raises(ValueError, match="even"):
    shunted.ShuntedAttention(48, 3, 4, rngs=nnx.Rngs(0))   # two head groups need an even head count
  with pytest.raises(ValueError, match="even"):
    shunted.ShuntedAttention(48, 4, 3, rngs=nnx.Rngs(0))   # and an even rate (r and r / 2)
  with pytest.raises(ValueError, match="stages"):
    nnx.eval_shape(lambda: create_model("shunted_t", depths=(1, 1, 1)))


@pytest.fixture(scope="module")
def eval_forward():
  model = tiny(drop_path_rate=0.9)   # per-block rates 0, 0.3, 0.6, 0.9 (only used in train mode)
  model.eval()
  fwd = nnx.jit(lambda m, x: m(x, return_intermediates=True))
  return model, fwd


def test_non_square_input_shapes_and_attention_groups(eval_forward):
  model, fwd = eval_forward
  x = jax.random.normal(jax.random.key(0), (2, 64, 96, 3))
  logits, inter = fwd(model, x)
  assert logits.shape == (2, 7) and np.isfinite(np.asarray(logits)).all()
  grids = [(16, 24), (8, 12), (4, 6), (2, 3)]
  assert [tuple(g) for g in inter["grids"]] == grids
  assert sorted(inter["stage_tokens"]) == ["block1.0", "block2.0", "block3.0", "block4.0"]
  assert len(inter["tokens"]) == 4
  for s, ((h, w), c) in enumerate(zip(grids, TINY["embed_dims"])):
    tok = inter["stage_tokens"][f"block{s + 1}.0"]
    assert tok.shape == (2, h * w, c)
    np.testing.assert_array_equal(np.asarray(tok), np.asarray(inter["tokens"][s]))
    assert inter["stages"][s].shape == (2, h, w, c)
  # Stages 1-3: two head groups; keys at rate r (coarse) and r/2 (fine): floor(H/r) * floor(W/r).
  for s, r in enumerate((8, 4, 2)):
    (h, w), heads = grids[s], TINY["num_heads"][s]
    coarse, fine = inter["attn"][s]
    assert coarse.shape == (2, heads // 2, h * w, (h // r) * (w // r))
    assert fine.shape == (2, heads // 2, h * w, (2 * h // r) * (2 * w // r))
    np.testing.assert_allclose(np.asarray(coarse).sum(-1), 1.0, atol=1e-5)
  # Stage 4: one ordinary multi-head map over all tokens.
  a4 = inter["attn"][3]
  assert not isinstance(a4, tuple) and a4.shape == (2, 4, 6, 6)
  np.testing.assert_allclose(np.asarray(inter["pre_logits"]), np.asarray(inter["stages"][3]).mean((1, 2)),
                             atol=1e-6)


def test_eval_is_deterministic_and_train_uses_batch_statistics(eval_forward):
  model, fwd = eval_forward
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  e1, _ = fwd(model, x)
  e2, _ = fwd(model, x)
  np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
  bn = model.patch_embed1.conv[1]
  mean_before = np.asarray(bn.mean[...]).copy()
  model.train()
  try:
    assert model.block2[0].drop_path.deterministic is False and bn.use_running_average is False
    t1, _ = fwd(model, x)
    t2, _ = fwd(model, x)
  finally:
    model.eval()
  # Drop-path draws differ between calls; BatchNorm running statistics were updated by the train passes.
  assert np.max(np.abs(np.asarray(t1) - np.asarray(t2))) > 1e-4
  assert np.max(np.abs(np.asarray(bn.mean[...]) - mean_before)) > 1e-4
  assert np.max(np.abs(np.asarray(t1) - np.asarray(e1))) > 1e-4


def test_too_small_input_is_rejected(eval_forward):
  model, _ = eval_forward
  with pytest.raises(ValueError, match="stage-1 map"):
    nnx.eval_shape(lambda m, x: m(x), model, jnp.zeros((1, 16, 16, 3)))


@pytest.mark.parametrize("shape,kernel,pad", [((2, 7, 5, 24), 3, 1), ((1, 6, 9, 8), 5, 2), ((2, 4, 4, 8), 3, 0)])
def test_depthwise_conv_shifted_sum_equals_the_grouped_convolution(shape, kernel, pad, monkeypatch):
  """The depthwise convs run as shifted multiply-adds on CPU (DEPTHWISE_IMPL); same outputs and gradients
  as XLA's grouped convolution, with and without bias, any kernel size and padding."""
  c = shape[-1]
  for bias in (True, False):
    conv = layers.conv(c, c, kernel, 1, pad, groups=c, use_bias=bias, rngs=nnx.Rngs(0))
    assert isinstance(conv, layers.DepthwiseConv) and isinstance(conv, nnx.Conv)   # interop sees an nnx.Conv
    if bias:
      conv.bias.set_value(jax.random.normal(jax.random.key(2), (c,)))
    graphdef, params = nnx.split(conv)
    x = jax.random.normal(jax.random.key(1), shape)

    def run(impl):
      monkeypatch.setitem(layers.DEPTHWISE_IMPL, jax.default_backend(), impl)
      f = lambda p, x: nnx.merge(graphdef, p)(x)
      out = jax.jit(f)(params, x)
      grads = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(f(p, x))), argnums=(0, 1)))(params, x)
      return out, grads

    (out_s, g_s), (out_c, g_c) = run("shifted"), run("conv")
    assert out_s.shape == out_c.shape == (shape[0], shape[1] + 2 * pad - kernel + 1,
                                          shape[2] + 2 * pad - kernel + 1, c)
    np.testing.assert_allclose(out_s, out_c, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_c)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_only_stride1_depthwise_convs_take_the_shifted_form():
  model = nnx.eval_shape(lambda: create_model("shunted_t", **TINY))
  kinds = {"/".join(map(str, p)): type(m).__name__ for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)}
  depthwise = {p for p, k in kinds.items() if k == "DepthwiseConv"}
  assert depthwise and all(p.endswith(("local_conv1", "local_conv2", "local_conv", "dwconv/dwconv"))
                           for p in depthwise)
  assert all(k == "Conv" for p, k in kinds.items() if p not in depthwise)
  assert any(p.endswith("sr1") for p in kinds)
