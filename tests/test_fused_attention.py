"""The fused attention path equals the explicit one: outputs and gradients of plain attention, EViT's
reorganising block (its class-token row computed on its own: same scores, same kept indices), Shunted's
head-group attention and CaiT's class attention; which kernel each case gets (explicit where a fix needs the
map, the fused kernel otherwise) and the cuDNN constraints. The explicit form is forced with
`attention.use_implementation('explicit')`; golden parity (maps asked for) is in test_golden_parity.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vit_jax_fix.models import attention, shunted
from vit_jax_fix.models.attention import Attention, ClassAttention
from vit_jax_fix.models.vit import Block, VisionTransformer

TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture
def calls(monkeypatch):
  """Counts the calls of the fused kernel (attention.fused_attention) while tracing."""
  n = {"fused": 0}
  real = attention.fused_attention

  def spy(*args):
    n["fused"] += 1
    return real(*args)

  monkeypatch.setattr(attention, "fused_attention", spy)
  return n


def _value_and_grads(module, fn, *args):
  """fn(module, *args) -> array or dict with 'out'; returns (value, grads of a weighted sum of 'out' over the
  params and args[0]), traced afresh by jax.jit."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def loss(p, x0, *more):
    res = fn(nnx.merge(graphdef, p, rest), x0, *more)
    out = res["out"] if isinstance(res, dict) else res
    return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))), res

  (_, res), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, *args)
  return res, grads


def _shapes(module, fn, *args):
  """Output shapes of fn(module, *args) without running it."""
  graphdef, state = nnx.split(module)
  return jax.eval_shape(lambda st, *a: fn(nnx.merge(graphdef, st), *a), state, *args)


def _both(module, fn, *args):
  """(fused, explicit) results of _value_and_grads; each traced afresh. The fused side is forced to 'xla':
  on CPU, SITE_IMPL keeps EViT and Shunted explicit by default."""
  with attention.use_implementation("xla"):
    fused = _value_and_grads(module, fn, *args)
  with attention.use_implementation("explicit"):
    explicit = _value_and_grads(module, fn, *args)
  return fused, explicit


def _assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL), a, b)


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_attention_fused_equals_explicit(calls):
  attn = Attention(32, 4, rngs=nnx.Rngs(0), attn_scale=True)   # AttnScale's closed form on the fused output
  attn.lamb[...] = jnp.linspace(-0.5, 0.5, 4)
  fused, explicit = _both(attn, lambda m, x: m(x)[0], _x((2, 17, 32)))
  _assert_close(fused, explicit)
  assert calls["fused"] == 1


def test_evit_block_class_row_same_scores_indices_and_gradients(calls):
  blk = Block(32, 4, rngs=nnx.Rngs(1), keep_rate=0.6, fuse_token=True)   # fused token: gradient through scores

  def run(m, x):
    y, aux = m(x)
    return {"out": y, "scores": aux["reorg"]["cls_attn"], "idx": aux["reorg"]["idx"]}

  (fused, g_fused), (explicit, g_explicit) = _both(blk, run, _x((3, 21, 32), 1))
  np.testing.assert_array_equal(np.asarray(fused.pop("idx")), np.asarray(explicit.pop("idx")))
  _assert_close((fused, g_fused), (explicit, g_explicit))
  assert calls["fused"] == 1   # the fused trace: the class row did not ask for the full map


def test_evit_block_takes_the_class_row_not_the_full_map():
  blk = Block(32, 4, rngs=nnx.Rngs(1), keep_rate=0.6)
  with attention.use_implementation("xla"):
    jaxpr = str(jax.make_jaxpr(lambda x: blk(x)[0])(_x((2, 21, 32))))
  # The fused XLA kernel builds its own (B, H, N, N) logits; the class row is the only softmax over (.., 1, N).
  assert "f32[2,4,1,21]" in jaxpr
  with attention.use_implementation("explicit"):
    jaxpr = str(jax.make_jaxpr(lambda x: blk(x)[0])(_x((2, 21, 32))))
  assert "f32[2,4,1,21]" not in jaxpr


def test_evit_model_logits_fused_equal_explicit():
  model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5,
                            keep_rate=0.5, keep_rate_blocks=(0,), fuse_token=True, rngs=nnx.Rngs(2))
  graphdef, state = nnx.split(model)
  run = lambda st, x: nnx.merge(graphdef, st)(x)
  x = _x((2, 32, 32, 3), 2)
  with attention.use_implementation("xla"):
    fused = jax.jit(run)(state, x)
  with attention.use_implementation("explicit"):
    explicit = jax.jit(run)(state, x)
  _assert_close(fused, explicit)


def test_shunted_attention_fused_per_head_group_equals_explicit(calls):
  # sr_ratio 4: two head groups (keys reduced 4x4 and 2x2), each its own fused call; sr_ratio 1 (stage 4)
  # runs the same _attend with one group.
  attn = shunted.ShuntedAttention(32, 4, 4, rngs=nnx.Rngs(3))
  fused, explicit = _both(attn, lambda m, x: m(x, (8, 8))[0], _x((2, 64, 32), 3))
  _assert_close(fused, explicit)
  assert calls["fused"] == 2


def test_cait_class_attention_fused_when_named_equals_explicit(calls):
  ca = ClassAttention(32, 4, rngs=nnx.Rngs(5))
  u = _x((2, 17, 32), 5)
  with attention.use_implementation("xla"):
    fused = _value_and_grads(ca, lambda m, x: m(x, return_map=False)[0], u)
  assert calls["fused"] == 1
  explicit = _value_and_grads(ca, lambda m, x: m(x)[0], u)
  _assert_close(fused, explicit)
  # The CPU default (SITE_IMPL) keeps the explicit single-row form: nothing to gain from a kernel.
  _value_and_grads(ca, lambda m, x: m(x, return_map=False)[0], u)
  assert calls["fused"] == 1


def test_map_kept_for_fixes_that_need_it_and_dropout_only_in_training(calls):
  x = _x((2, 9, 32))
  for kw in ({"talking_heads": True}, {"reattention": True}):
    assert _shapes(Attention(32, 4, rngs=nnx.Rngs(0), **kw), lambda m, x: m(x)[1], x).shape == (2, 4, 9, 9)
  attn = Attention(32, 4, rngs=nnx.Rngs(0), attn_drop=0.1)
  assert _shapes(attn, lambda m, x: m(x)[1], x).shape == (2, 4, 9, 9)   # training: dropout on the map
  assert calls["fused"] == 0
  attn.eval()
  assert _shapes(attn, lambda m, x: m(x)[1], x) is None                 # eval: no dropout, fused
  assert calls["fused"] == 1
  assert _shapes(attn, lambda m, x: m(x, return_map=True)[1], x).shape == (2, 4, 9, 9)   # diagnostics
  sa = shunted.ShuntedAttention(32, 4, 4, rngs=nnx.Rngs(0), attn_drop=0.1)
  maps = _shapes(sa, lambda m, x: m(x, (8, 8))[1], _x((2, 64, 32)))
  assert maps is None and calls["fused"] == 1                           # training: explicit, none returned
  maps = _shapes(sa, lambda m, x: m(x, (8, 8), return_map=True)[1], _x((2, 64, 32)))
  assert maps[0].shape == (2, 2, 64, 4) and maps[1].shape == (2, 2, 64, 16)


def test_implementation_choice_and_cudnn_constraints(monkeypatch):
  assert attention.implementation_for(jnp.float32, 64) is None          # CPU default: jax's choice (XLA)
  for site in ("evit", "shunted", "class_attention"):                     # measured faster explicit on CPU
    assert attention.implementation_for(jnp.float32, 64, site) == "explicit"
  with attention.use_implementation("cudnn"):
    assert attention.implementation_for(jnp.bfloat16, 64) == "xla"       # no CUDA backend here
  with pytest.raises(ValueError, match="one of"):
    with attention.use_implementation("flash"):
      pass
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attention.cudnn_supported(jnp.bfloat16, 64) and attention.cudnn_supported(jnp.float16, 128)
  assert not attention.cudnn_supported(jnp.float32, 64)                 # fp16/bf16 only
  assert not attention.cudnn_supported(jnp.bfloat16, 12)                # head dim a multiple of 8
  assert not attention.cudnn_supported(jnp.bfloat16, 192)               # and <= 128 (256 from Hopper on)
  monkeypatch.setitem(attention.AUTO_IMPL, "gpu", "cudnn")
  assert attention.implementation_for(jnp.bfloat16, 64) == "cudnn"
  assert attention.implementation_for(jnp.bfloat16, 64, "shunted") == "cudnn"   # no GPU entry in SITE_IMPL
  assert attention.implementation_for(jnp.float32, 64) == "xla"
