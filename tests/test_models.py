"""Model zoo: exact parameter counts, the fixes' alternative implementations agree, composition, jit."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vit_jax_fix
from vit_jax_fix.interop import torch_keys
from vit_jax_fix.models import shortcuts, spectral
from vit_jax_fix.models.attention import Attention
from vit_jax_fix.models.registry import count_params, get_spec
from tests.testdata import STATE_DICTS, data_files

OFFICIAL = [p.stem for p in data_files(STATE_DICTS, ".tsv")]
TINY = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=2, num_classes=10)


def reference_listing(name):
  text = (STATE_DICTS / f"{name}.tsv").read_text()
  params = int(re.search(r"# params\t(\d+)", text).group(1))
  keys = {}
  for line in text.splitlines():
    if line and not line.startswith("#"):
      key, shape, _ = line.split("\t")
      keys[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
  return params, keys


@pytest.mark.parametrize("name", OFFICIAL)
def test_parameter_count_and_keys_equal_official(name):
  """Counted on an abstract model (nnx.eval_shape compiles and allocates nothing)."""
  params, keys = reference_listing(name)
  model = nnx.eval_shape(lambda: vit_jax_fix.create_model(name))
  assert count_params(model) == params
  assert torch_keys(model) == keys


def test_every_official_listing_is_registered():
  missing = set(OFFICIAL) - set(vit_jax_fix.list_models())
  assert not missing


def test_unknown_override_names_nearest_valid():
  with pytest.raises(TypeError, match="embed_dim"):
    vit_jax_fix.create_model("deit_tiny_patch16_224", embed_dims=64)
  with pytest.raises(KeyError, match="deit_small_patch16_224"):
    vit_jax_fix.create_model("deit_smal_patch16_224")


@pytest.mark.parametrize("din,dout,num_cir", [(64, 64, 4), (48, 96, 4), (96, 48, 2)])
def test_circulant_fft_equals_dense(din, dout, num_cir):
  rngs = nnx.Rngs(0)
  fft = shortcuts.CirculantLinear(din, dout, num_cir, impl="fft", rngs=rngs)
  dense = shortcuts.CirculantLinear(din, dout, num_cir, impl="dense", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 5, din))
  y_fft, y_dense = fft(x), dense(x)
  np.testing.assert_allclose(y_fft, y_dense, rtol=1e-5, atol=2e-6)
  # And both equal the official closed form W[I*b + r, J*b + c] = w[(I*K_in + J)*b + (r - c) mod b].
  w = np.asarray(fft.weight_list[...], np.float64)
  b, k_in, k_out = shortcuts.circulant_geometry(din, dout, num_cir)
  W = np.zeros((dout, din))
  for i in range(dout):
    for j in range(din):
      I, r, J, c = i // b, i % b, j // b, j % b
      W[i, j] = w[(I * k_in + J) * b + (r - c) % b]
  ref = np.asarray(x, np.float64) @ W.T + np.asarray(fft.bias[...])
  np.testing.assert_allclose(y_fft, ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("impl", ["fft", "dense"])
def test_circulant_group_equals_paths_one_by_one(impl):
  """apply_group (shared FFT of the input, or one GEMM) gives each projection's own output, with grads."""
  projs = [shortcuts.CirculantLinear(48, 48, 4, impl=impl, rngs=nnx.Rngs(i)) for i in range(2)]
  ref = [shortcuts.CirculantLinear(48, 48, 4, impl="dense" if impl == "fft" else "fft", rngs=nnx.Rngs(i))
         for i in range(2)]
  x = jax.random.normal(jax.random.key(1), (2, 7, 48))
  got = shortcuts.apply_group(projs, x)
  for g, p, r in zip(got, projs, ref):
    np.testing.assert_allclose(g, r(x), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(g, p(x), rtol=1e-6, atol=1e-6)
  loss = lambda xx: sum(jnp.sum(jnp.sin(y)) for y in shortcuts.apply_group(projs, xx))
  loss_ref = lambda xx: sum(jnp.sum(jnp.sin(r(xx))) for r in ref)
  np.testing.assert_allclose(jax.grad(loss)(x), jax.grad(loss_ref)(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("din,dout,num_cir", [(48, 48, 4), (48, 96, 4), (96, 48, 2), (45, 45, 3)])
def test_circulant_fft_gradient_equals_dense(din, dout, num_cir):
  """Gradients of the FFT form (through rfft/irfft, whose transposes treat the half spectrum differently for
  even and odd block sizes) against those of the dense matmul: weights, biases and input, two paths read
  together, square and rectangular geometries, an odd block. A hand-written backward must pass it too
  (one was tried, benchmarks/README.md)."""
  def grads(impl):
    projs = [shortcuts.CirculantLinear(din, dout, num_cir, impl=impl, rngs=nnx.Rngs(i)) for i in range(2)]
    graphdef, params = nnx.split(projs)
    x = jax.random.normal(jax.random.key(1), (2, 7, din))
    def loss(params, x):
      ys = shortcuts.apply_group(nnx.merge(graphdef, params), x)
      return sum(jnp.sum(jnp.sin(y) * (k + 1)) for k, y in enumerate(ys))
    return jax.grad(loss, argnums=(0, 1))(params, x)
  (gp_fft, gx_fft), (gp_dense, gx_dense) = grads("fft"), grads("dense")
  np.testing.assert_allclose(gx_fft, gx_dense, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(gp_fft), jax.tree.leaves(gp_dense)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_circulant_auto_impl_resolves_per_backend():
  layer = shortcuts.CirculantLinear(48, 48, 4, rngs=nnx.Rngs(0))           # impl='auto' (default)
  assert layer.impl == shortcuts.AUTO_IMPL.get(jax.default_backend(), "dense")
  model = vit_jax_fix.create_model("augvit_small_circulant2", **TINY)
  assert model.blocks[0].augs.impl in ("fft", "dense")
  with pytest.raises(ValueError, match="circulant_impl"):
    shortcuts.CirculantLinear(48, 48, 4, impl="fast", rngs=nnx.Rngs(0))


def test_gelu_is_torch_exact_gelu():
  """layers.gelu (erf form, torch's formula) against float64 torch GELU; gradient against the erfc form."""
  torch = pytest.importorskip("torch")
  from vit_jax_fix.models import layers
  x = np.random.default_rng(0).normal(0, 3, 4096).astype(np.float32)
  ref = torch.nn.functional.gelu(torch.from_numpy(x.astype(np.float64))).numpy()
  np.testing.assert_allclose(np.asarray(layers.gelu(jnp.asarray(x)), np.float64), ref, rtol=0, atol=2e-6)
  g = jax.grad(lambda t: jnp.sum(layers.gelu(t)))(jnp.asarray(x))
  g_ref = jax.grad(lambda t: jnp.sum(jax.nn.gelu(t, approximate=False)))(jnp.asarray(x))
  np.testing.assert_allclose(g, g_ref, rtol=0, atol=2e-6)


def test_attnscale_fused_equals_explicit():
  attn = Attention(32, 4, attn_scale=True, rngs=nnx.Rngs(0))
  attn.lamb.set_value(jax.random.normal(jax.random.key(2), (4,)))
  x = jax.random.normal(jax.random.key(3), (2, 9, 32))
  fused, _ = attn(x)                       # A_hat v = (1 + l) A v - l mean(v), no map materialised
  explicit, probs = attn(x, return_map=True)
  assert probs is not None
  np.testing.assert_allclose(fused, explicit, rtol=1e-5, atol=1e-6)
  # Explicit form from its definition: A_hat = 1/N + (1 + lamb) (A - 1/N).
  attn.lamb.set_value(jnp.zeros(4))
  plain, _ = attn(x)
  assert not np.allclose(plain, fused, atol=1e-4)


@pytest.mark.parametrize("double", [False, True])
def test_featscale_two_band_fft_equals_mean(double):
  fft = spectral.FeatScale(16, bands=2, double=double, impl="fft")
  mean = spectral.FeatScale(16, bands=2, double=double, impl="mean")
  l1 = jax.random.normal(jax.random.key(0), (16,))
  l2 = jax.random.normal(jax.random.key(1), (16,))
  for m in (fft, mean):
    m.lamb1.set_value(l1)
    m.lamb2.set_value(l2)
  a = jax.random.normal(jax.random.key(2), (2, 17, 16))
  np.testing.assert_allclose(fft(a), mean(a), rtol=1e-5, atol=1e-5)
  # The default ('auto') takes the closed form of the two-band scaling: bit-identical to 'mean'.
  auto = spectral.FeatScale(16, bands=2, double=double)
  auto.lamb1.set_value(l1)
  auto.lamb2.set_value(l2)
  np.testing.assert_array_equal(auto(a), mean(a))
  # The official ViT form adds lamb1*DC + lamb2*HC twice.
  dc = a.mean(axis=1, keepdims=True)
  k = 2 if double else 1
  np.testing.assert_allclose(mean(a), a + k * (l1 * dc + l2 * (a - dc)), rtol=1e-6, atol=1e-6)


def test_featscale_radial_bands_partition_the_spectrum():
  """With equal band gains the K-band form reduces to the two-band form; unequal gains act per band."""
  fs = spectral.FeatScale(8, bands=4, impl="fft")
  two = spectral.FeatScale(8, bands=2, impl="mean")
  l1, l2 = jnp.linspace(-1, 1, 8), jnp.linspace(0.5, -0.5, 8)
  fs.lamb1.set_value(l1)
  fs.lamb2.set_value(jnp.stack([l2] * 3))
  two.lamb1.set_value(l1)
  two.lamb2.set_value(l2)
  a = jax.random.normal(jax.random.key(0), (2, 1 + 16, 8))
  np.testing.assert_allclose(fs(a, grid=(4, 4), num_prefix=1), two(a), rtol=1e-5, atol=1e-5)
  auto = spectral.FeatScale(8, bands=4)                    # the default: K > 2 bands need the 2-D FFT
  auto.lamb1.set_value(l1)
  auto.lamb2.set_value(jnp.stack([l2, -l2, 2 * l2]))
  fs.lamb2.set_value(jnp.stack([l2, -l2, 2 * l2]))
  np.testing.assert_allclose(auto(a, grid=(4, 4), num_prefix=1), fs(a, grid=(4, 4), num_prefix=1), atol=1e-6)
  with pytest.raises(ValueError, match="feat_scale_impl='mean' computes only the two-band form"):
    spectral.FeatScale(8, bands=4, impl="mean")
  # A constant patch map has no energy outside DC: band gains on the higher bands cannot change it.
  const = jnp.ones((1, 17, 8))
  fs.lamb1.set_value(jnp.zeros(8))
  fs.lamb2.set_value(jnp.stack([jnp.zeros(8), jnp.ones(8) * 3, jnp.ones(8) * 5]))
  np.testing.assert_allclose(fs(const, grid=(4, 4), num_prefix=1), const, atol=1e-6)


COMBOS = {
    "deit3+aug+featscale": ("deit_small_patch16_LS", dict(aug_shortcut="circulant2", feat_scale="double")),
    "deit+reattn_last1": ("deit_small_patch16_224", dict(reattention="last:1")),
    "cait+attnscale+featscale": ("cait_XXS24_224", dict(attn_scale=True, feat_scale="single",
                                                        class_attn_depth=1)),
    "augvit+evit": ("augvit_small_circulant2", dict(keep_rate=0.5, keep_rate_blocks=(0,))),
    "deepvit_S_tiny": ("deepvit_S", dict(reattention="last:1", embed_dim=32, patch_size=8)),
    "featscale_4bands": ("featscale_small_12", dict(feat_scale_bands=4)),
}


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_composed_fixes_train_step_is_finite_and_jits_once(combo):
  name, fixes = COMBOS[combo]
  model = vit_jax_fix.create_model(name, **{**TINY, **fixes})
  model.train()
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  y = jnp.array([1, 2])
  traces = []

  @nnx.jit
  def step(model, x, y):
    traces.append(1)

    def loss_fn(model):
      logits = model(x)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    return nnx.value_and_grad(loss_fn)(model)

  for _ in range(2):
    loss, grads = step(model, x, y)
  assert len(traces) == 1
  assert np.isfinite(float(loss))
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)


def test_combination_that_cannot_work_is_a_clear_error():
  def build(name, **kw):
    return nnx.eval_shape(lambda: vit_jax_fix.create_model(name, **kw))

  with pytest.raises(ValueError, match="class token"):
    build("cait_XXS24_224", **TINY, keep_rate=0.7)
  with pytest.raises(ValueError, match="num_cir"):
    build("augvit_small_circulant2", **{**TINY, "embed_dim": 30}, num_cir=4)
  with pytest.raises(ValueError, match="feat_scale_bands"):
    build("featscale_small_12", **TINY, feat_scale_bands=3, keep_rate=0.5, keep_rate_blocks=(0,))
  with pytest.raises(ValueError, match="keep_rate"):
    build("deit_small_patch16_shrink_base", **TINY, keep_rate=1.5, keep_rate_blocks=(0,))


def test_intermediates_and_eval_mode():
  model = vit_jax_fix.create_model("deepvit_patch16_224_re_attn_16b", **{**TINY, "num_heads": 4},
                                    drop_path_rate=0.5)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  model.eval()
  a = model(x)
  b, inter = model(x, return_intermediates=True)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)   # eval mode: deterministic
  assert len(inter["tokens"]) == 2 and inter["tokens"][0].shape == (2, 17, 32)
  assert inter["attn"][0].shape == (2, 4, 17, 17)
  np.testing.assert_allclose(inter["attn"][0].sum(-1), 1.0, rtol=1e-5)
  model.train()
  c = model(x)
  assert not np.allclose(a, c)  # drop-path and BatchNorm batch statistics are active in train mode


def test_bf16_compute_close_to_fp32():
  model = vit_jax_fix.create_model("augvit_small_circulant2", **TINY, attn_scale=True)
  model_bf16 = vit_jax_fix.create_model("augvit_small_circulant2", **TINY, attn_scale=True,
                                        dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  model.eval(), model_bf16.eval()
  ref, low = model(x), model_bf16(x)
  assert low.dtype == jnp.float32 or low.dtype == jnp.bfloat16
  assert jax.tree.leaves(nnx.state(model_bf16, nnx.Param))[0].dtype == jnp.float32  # params stay fp32
  err = float(jnp.max(jnp.abs(low.astype(jnp.float32) - ref)))
  assert 0 < err < 0.1 * float(jnp.max(jnp.abs(ref))) + 0.05


@pytest.mark.parametrize("scan_blocks", [True, False])
def test_bf16_residual_stream_keeps_its_dtype(scan_blocks):
  """dtype given by name (as a config holds it); LayerScale and FeatScale gains are fp32 parameters and must
  not promote the residual stream: every block returns bf16, also under lax.scan (whose carry cannot change
  dtype), and the result stays close to fp32."""
  kw = dict(TINY, depth=3, layer_scale=1e-1, feat_scale="double", scan_blocks=scan_blocks)
  model = vit_jax_fix.create_model("deit_small_patch16_224", **kw)
  low = vit_jax_fix.create_model("deit_small_patch16_224", **kw, dtype="bfloat16")
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  model.eval(), low.eval()
  out, inter = low(x, return_intermediates=True)
  assert {t.dtype for t in inter["tokens"]} == {jnp.dtype(jnp.bfloat16)}
  ref = model(x)
  assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.1 * float(jnp.max(jnp.abs(ref))) + 0.05


def test_create_model_under_eval_shape_allocates_nothing():
  model = nnx.eval_shape(lambda: vit_jax_fix.create_model("deit_base_patch16_224"))
  leaf = jax.tree.leaves(nnx.state(model))[0]
  assert isinstance(leaf, jax.ShapeDtypeStruct)
  assert get_spec("augvit_small_circulant2").preprocessing()["mean"] == (0.5, 0.5, 0.5)


def test_scanned_blocks_train_like_the_loop():
  """scan_blocks changes how blocks run, not what they compute: same loss, gradients and BatchNorm
  statistics as the per-block loop, in train mode with drop-path off and re-attention BatchNorm on."""
  kw = dict(TINY, depth=3, num_heads=4)

  def run(scan):
    model = vit_jax_fix.create_model("deepvit_patch16_224_re_attn_16b", **kw, scan_blocks=scan)
    model.train()
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    loss, grads = nnx.jit(lambda m: nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(m))(model)
    return loss, nnx.to_pure_dict(grads), nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  (l0, g0, s0), (l1, g1, s1) = run(False), run(True)
  np.testing.assert_allclose(l0, l1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s0, s1)
  assert not np.allclose(s0["blocks"][0]["attn"]["var_norm"]["mean"], 0.0)  # statistics were updated


@pytest.mark.parametrize("name", ["deepvit_patch16_224_re_attn_16b", "augvit_small_circulant2"])
def test_remat_policies_train_like_no_remat(name):
  """remat (what the backward pass of scanned blocks keeps) changes memory and speed, not the result:
  False, True and 'dots' (the default) give the same loss, gradients and BatchNorm statistics."""
  kw = dict(TINY, depth=3, num_heads=4)

  def run(remat):
    model = vit_jax_fix.create_model(name, **kw, remat=remat)
    model.train()
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    loss, grads = nnx.jit(lambda m: nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(m))(model)
    return loss, nnx.to_pure_dict(grads), nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  assert vit_jax_fix.create_model(name, **kw).remat == "dots"
  ref = run(False)
  for remat in (True, "dots"):
    got = run(remat)
    np.testing.assert_allclose(ref[0], got[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), ref[1], got[1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ref[2], got[2])
  with pytest.raises(ValueError, match="remat"):
    vit_jax_fix.create_model(name, **kw, remat="everything")
