"""EViT token reorganisation: official token-count arithmetic, shapes in the real model, reorganisation on
other backbones, the compute it saves, DeiT weights loading as is, and the keep-rate schedule with a bounded
number of compiled programs. Parity with the official code is in test_golden_parity.py (evit_* cases)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.test_shunted import numpy_init
from vit_jax_fix.interop import from_torch_state_dict, to_torch_state_dict, torch_keys
from vit_jax_fix.models import keep_rate as K
from vit_jax_fix.models import token_reorg
from vit_jax_fix.models.registry import create_model

TINY = dict(depth=6, embed_dim=64, num_heads=4, img_size=32, patch_size=4, num_classes=10)   # 65 tokens


def official_counts(n0, rate, fuse, num_reorg):
  """evit.py arithmetic, written out: left = ceil(rate * (N - 1)) in float64; + cls (+ fused token)."""
  out, n = [], n0
  for _ in range(num_reorg):
    left = math.ceil(rate * (n - 1))
    if left < n - 1:
      n = left + 1 + int(fuse)
    out.append(n)
  return out


# evit.md section 4: token counts after blocks 3 / 6 / 9 of DeiT-S at 224 (197 tokens).
TABLE_224 = {0.9: ((179, 163, 148), (178, 161, 145)), 0.8: ((159, 129, 105), (158, 127, 102)),
             0.7: ((140, 100, 72), (139, 98, 69)), 0.6: ((120, 74, 46), (119, 72, 44)),
             0.5: ((100, 52, 28), (99, 50, 26))}


@pytest.mark.parametrize("rate", sorted(TABLE_224))
@pytest.mark.parametrize("fuse", [True, False])
def test_tokens_after_matches_official_table_at_224(rate, fuse):
  expected = TABLE_224[rate][0 if fuse else 1]
  n, got = 197, []
  for _ in range(3):
    n = token_reorg.tokens_after(n, rate, fuse)
    got.append(n)
  assert tuple(got) == expected == tuple(official_counts(197, rate, fuse, 3))
  per_block = [rate if i in (3, 6, 9) else 1.0 for i in range(12)]
  counts = K.token_counts(197, per_block, fuse)
  assert (counts[3], counts[6], counts[9], counts[11]) == expected + (expected[-1],)
  assert counts[:3] == [197] * 3


def test_tokens_after_higher_resolution_and_edge_cases():
  # Registered high-resolution variants (evit.md 4): 272 px @ 0.7, 288 @ 0.6, 304 @ 0.5, with fusion.
  for px, rate, expected in ((272, 0.7, (205, 145, 103)), (288, 0.6, (197, 120, 74)), (304, 0.5, (183, 93, 48))):
    n, got = (px // 16) ** 2 + 1, []
    for _ in range(3):
      n = token_reorg.tokens_after(n, rate, True)
      got.append(n)
    assert tuple(got) == expected
  assert token_reorg.tokens_after(197, 1.0, True) == 197             # rate 1: no fused token is made
  assert token_reorg.tokens_after(11, 0.95, True) == 11              # ceil(9.5) = 10 = N - 1: skipped
  assert token_reorg.kept_tokens(197, 0.7) == 138                    # float64 ceil, not round
  with pytest.raises(ValueError):
    token_reorg.kept_tokens(197, 0.0)


def abstract_tokens(name, x_shape=(2, 32, 32, 3), **kw):
  """Block-output shapes and reorg index shapes of the real model, traced with eval_shape (nothing runs)."""
  model = nnx.eval_shape(lambda: create_model(name, **kw))
  out = nnx.eval_shape(lambda m, x: m(x, return_intermediates=True)[1], model, jnp.zeros(x_shape))
  return ([t.shape for t in out["tokens"]],
          [None if r is None else (r["idx"].shape, r["cls_attn"].shape) for r in out["reorg"]])


@pytest.mark.parametrize("rate,fuse,golden", [(0.7, True, (47, 35)), (0.5, True, (34, 19)), (0.7, False, (46, 33)),
                                              (0.9, True, None), (0.6, False, None), (0.3, True, None)])
def test_real_model_block_shapes_follow_the_arithmetic(rate, fuse, golden):
  shapes, reorg = abstract_tokens("deit_small_patch16_shrink_base", keep_rate=rate, keep_rate_blocks=(1, 3),
                                  fuse_token=fuse, **TINY)
  after1, after3 = official_counts(65, rate, fuse, 2)
  if golden:   # the token counts of tests/data/golden/README.md
    assert (after1, after3) == golden
  assert [s[1] for s in shapes] == [65, after1, after1, after3, after3, after3]
  assert all(s[0] == 2 and s[2] == 64 for s in shapes)
  assert reorg[0] is None and reorg[2] is None and reorg[4] is None
  assert reorg[1] == ((2, math.ceil(rate * 64)), (2, 64))
  assert reorg[3] == ((2, math.ceil(rate * (after1 - 1))), (2, after1 - 1))


@pytest.fixture(scope="module")
def forward():
  return nnx.jit(lambda m, x: m(x, return_intermediates=True))


@pytest.mark.parametrize("name,fuse", [("deit_small_patch16_LS", True), ("augvit_small_circulant2", False),
                                       ("attnscale_small_12", True), ("featscale_small_12", False),
                                       ("deepvit_patch16_224_re_attn_16b", True)])
def test_reorganisation_on_other_backbones(name, fuse, forward):
  kw = dict(keep_rate=0.7, keep_rate_blocks=(1,), depth=3, embed_dim=64, num_heads=4, img_size=32, patch_size=8,
            num_classes=5, fuse_token=fuse)
  model = numpy_init(nnx.eval_shape(lambda: create_model(name, **kw)), seed=3)
  model.eval()
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  logits, inter = forward(model, x)
  n1 = math.ceil(0.7 * 16) + 1 + int(fuse)                                     # 17 -> 13 (+ fused token)
  assert [t.shape for t in inter["tokens"]] == [(2, 17, 64), (2, n1, 64), (2, n1, 64)]
  assert logits.shape == (2, 5) and np.isfinite(np.asarray(logits)).all()
  assert all(np.isfinite(np.asarray(t)).all() for t in inter["tokens"])
  # The kept tokens are the top-k class-attention scores, in descending order.
  idx, scores = np.asarray(inter["reorg"][1]["idx"]), np.asarray(inter["reorg"][1]["cls_attn"])
  for b in range(2):
    kept = scores[b, idx[b]]
    assert np.all(np.diff(kept) <= 0)
    assert np.min(kept) >= np.max(np.delete(scores[b], idx[b]))
  assert inter["reorg"][0] is None and inter["reorg"][2] is None


def lowered_macs(name, **kw):
  """GMACs of one 224-px image as XLA's cost analysis of the lowered (not compiled) program counts them."""
  from vit_jax_fix.models.cost import xla_flops
  return xla_flops(nnx.eval_shape(lambda: create_model(name, **kw)), (1, 224, 224, 3)) / 2e9


def test_evit_program_does_less_work_than_deit():
  deit = lowered_macs("deit_small_patch16_224")
  evit = lowered_macs("deit_small_patch16_shrink_base")                  # keep rate 0.7 at 3, 6, 9, fused
  # evit.md 4: 4.60 vs 3.03 GMACs (matmuls only); XLA also counts the element-wise work (about +3%).
  assert 4.5 < deit < 4.9, deit
  assert 2.95 < evit < 3.25, evit
  assert 0.62 < evit / deit < 0.70


def test_deit_state_dict_loads_into_evit_as_is(forward):
  deit = numpy_init(nnx.eval_shape(lambda: create_model("deit_small_patch16_224", **TINY)), seed=5)
  evit = numpy_init(nnx.eval_shape(lambda: create_model(
      "deit_small_patch16_shrink_base", keep_rate=0.7, keep_rate_blocks=(1, 3), **TINY)), seed=6)
  assert torch_keys(deit) == torch_keys(evit)
  from_torch_state_dict(evit, to_torch_state_dict(deit))   # strict: same keys, same shapes
  deit.eval()
  evit.eval()
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  ref, _ = forward(deit, x)
  reorg_logits, inter = forward(evit, x)
  assert inter["tokens"][-1].shape[1] == 35
  assert np.isfinite(np.asarray(reorg_logits)).all()
  assert np.max(np.abs(np.asarray(reorg_logits) - np.asarray(ref))) > 1e-4   # reorganisation changes the output
  K.set_keep_rate(evit, 1.0)                                                   # runtime keep rate 1 = DeiT
  same, inter1 = forward(evit, x)
  assert inter1["tokens"][-1].shape[1] == 65
  np.testing.assert_allclose(np.asarray(same), np.asarray(ref), rtol=0, atol=1e-6)


# --- keep-rate schedule

def test_schedule_endpoints_monotone_and_quantised():
  base, start, ramp, g = 0.7, 100, 1000, 0.05
  grid = K.keep_rate_grid(base, g)
  assert grid == [0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]
  assert K.max_programs(base, g) == 7 == math.ceil(round((1 - base) / g, 9)) + 1   # (0.3 / 0.05 = 6.0000000001)
  assert K.max_programs(0.7, 0.1) == 4 and K.max_programs(0.5, 0.3) == 3 and K.max_programs(1.0, 0.05) == 1
  rates = [K.keep_rate_at(t, base_keep_rate=base, start_step=start, ramp_steps=ramp, granularity=g)
           for t in range(1500)]
  assert set(rates) <= set(grid) and len(set(rates)) == 7
  assert all(r == 1.0 for r in rates[:start + 1])
  assert all(r == base for r in rates[start + ramp:])
  assert all(a >= b for a, b in zip(rates, rates[1:]))
  exact = [K.cosine_keep_rate(t, base_keep_rate=base, start_step=start, ramp_steps=ramp) for t in range(1500)]
  assert max(abs(a - b) for a, b in zip(rates, exact)) <= g / 2 + 1e-12
  # The official per-iteration cosine: half-way through the ramp it is (1 + base) / 2.
  assert K.cosine_keep_rate(start + ramp // 2, base_keep_rate=base, start_step=start,
                            ramp_steps=ramp) == pytest.approx(0.85)
  # Unquantised, the ramp gives (almost) one program per step; quantised, at most max_programs.
  assert len(set(exact)) > 900
  # Fine-tuning recipe: constant base from step 0 (start 0, ramp 0): one program.
  assert {K.keep_rate_at(t, base_keep_rate=0.5, granularity=0.1) for t in range(50)} == {0.5}


def test_set_keep_rate_acts_only_on_configured_blocks():
  model = nnx.eval_shape(lambda: create_model("deit_small_patch16_shrink_base", **TINY,
                                              keep_rate=0.7, keep_rate_blocks=(1, 3)))
  assert K.reorg_blocks(model) == (1, 3)
  K.set_keep_rate(model, 1.0)
  assert [b.keep_rate for b in model.blocks] == [1.0] * 6
  assert K.reorg_blocks(model) == (1, 3)                     # remembered after setting 1.0
  K.set_keep_rate(model, 0.85)
  assert [b.keep_rate for b in model.blocks] == [1.0, 0.85, 1.0, 0.85, 1.0, 1.0]
  K.set_keep_rate(model, None)                               # evaluation: the configured rates
  assert [b.keep_rate for b in model.blocks] == [1.0, 0.7, 1.0, 0.7, 1.0, 1.0]
  K.set_keep_rate(model, 0.5, blocks=(-1,))
  assert [b.keep_rate for b in model.blocks] == [1.0] * 5 + [0.5]
  with pytest.raises(ValueError):
    K.set_keep_rate(model, 1.5)
  plain = nnx.eval_shape(lambda: create_model("deit_small_patch16_224", **TINY))
  with pytest.raises(ValueError, match="no reorganising blocks"):
    K.set_keep_rate(plain, 0.7)
  K.set_keep_rate(plain, 0.7, blocks=(2,))
  assert [b.keep_rate for b in plain.blocks] == [1.0, 1.0, 0.7, 1.0, 1.0, 1.0]


def test_schedule_run_compiles_at_most_the_documented_number_of_programs():
  kw = dict(depth=3, embed_dim=32, num_heads=2, img_size=16, patch_size=4, num_classes=4,
            keep_rate=0.5, keep_rate_blocks=(1,), fuse_token=True)              # 17 tokens -> 10 at rate 0.5
  model = numpy_init(nnx.eval_shape(lambda: create_model("deit_small_patch16_shrink_base", **kw)), seed=7)
  model.train()
  x = jax.random.normal(jax.random.key(3), (4, 16, 16, 3))
  y = jnp.arange(4) % 4

  def train_step(m, x, y):
    def loss_fn(m):
      logits, inter = m(x, return_intermediates=True)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)), inter["tokens"][-1]
    (loss, last), grads = nnx.value_and_grad(loss_fn, has_aux=True)(m)
    params = nnx.state(m, nnx.Param)
    nnx.update(m, jax.tree.map(lambda p, g: p - 0.01 * g, params, grads))
    return loss, jnp.int32(last.shape[1])

  step = K.CompiledByKeepRate.for_model(train_step)
  sched = dict(base_keep_rate=0.5, start_step=2, ramp_steps=8, granularity=0.25)
  num_steps = 14
  seen, tokens, losses = [], [], []
  for t in range(num_steps):
    rate = K.keep_rate_at(t, **sched)
    loss, n = step(rate, model, x, y)
    seen.append(rate)
    tokens.append(int(n))
    losses.append(float(loss))
  bound = K.max_programs(0.5, 0.25)
  assert bound == 3
  assert step.num_compiled == len(set(seen)) <= bound
  assert set(seen) == {1.0, 0.75, 0.5}
  # The official per-step cosine over the same steps would have needed one program per ramp step.
  assert len({K.cosine_keep_rate(t, base_keep_rate=0.5, start_step=2, ramp_steps=8) for t in range(num_steps)}) == 9
  # Each program runs the token count of its rate: 17 at 1.0, ceil(0.75*16)+2 = 14, ceil(0.5*16)+2 = 10.
  expected = {1.0: 17, 0.75: 14, 0.5: 10}
  assert tokens == [expected[r] for r in seen]
  assert all(np.isfinite(losses))
  # Evaluation at the configured rate (None) reuses the base-rate program.
  step(None, model, x, y)
  assert step.num_compiled == 3
  assert [b.keep_rate for b in model.blocks] == [1.0, 0.5, 1.0]
