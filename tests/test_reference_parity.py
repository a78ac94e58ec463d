"""Parity with independent PyTorch references (benchmarks/torch_reference.py, written from the math of
the papers) in cases the golden files of tests/data/golden do not have: other keep rates and block
positions, non-square images, the EViT no-op, EViT on other backbones (EViT), and non-square and odd input
sizes, other depths/widths/stems and larger batches (Shunted), and DeepViT in train mode (batch statistics,
running statistics, gradients).

Each reference is first checked against the golden files (official code), then our JAX model with random
weights is exported with `to_torch_state_dict(model, layout='official')`, loaded strict into the reference, and
both run the same batch in eval mode (NHWC for JAX, NCHW for torch). Compared: logits (golden tolerance
1e-5 + 1e-5 max|logits|), every block output (1e-5 max(1, max|ref|)) and, for EViT, the selected token indices
(exactly) and their scores. The EViT inputs are checked to keep the kept/boundary scores >= 1e-6 apart (the
top-k order is well defined); one Shunted case shrinks the inputs of the eps-1e-5 LayerNorms so that a wrong
epsilon would show.
"""
import jax
import numpy as np
import pytest
from flax import nnx

from tests import golden
from tests.test_shunted import numpy_init
from vit_jax_fix.interop import to_torch_state_dict
from vit_jax_fix.interop.torch_compat import import_timm
from vit_jax_fix.models.registry import create_model

import_timm()
import torch  # noqa: E402  (after import_timm, which prepares torchvision)

from benchmarks.torch_reference import RefShunted, reference_for, shunted_reference_for  # noqa: E402

EVIT = "deit_small_patch16_shrink_base"
TINY_VIT = dict(embed_dim=64, num_heads=4, depth=4, num_classes=10)


@nnx.jit
def _forward(model, x):
  return model(x, return_intermediates=True)


def jax_run(model, x_nhwc):
  model.eval()
  with jax.default_matmul_precision("highest"):
    logits, inter = _forward(model, x_nhwc)
  return np.asarray(logits), inter


def torch_model(ref, model):
  state = to_torch_state_dict(model, layout="official")
  ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
  return ref.eval()


def torch_run(ref, x_nhwc, blocks):
  """Logits and every block output of the reference (forward hooks on `blocks`, a {name: module})."""
  outs = {}
  hooks = [m.register_forward_hook(lambda mod, args, out, key=key: outs.__setitem__(key, out.numpy()))
           for key, m in blocks.items()]
  try:
    with torch.no_grad():
      logits = ref(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()
  finally:
    for h in hooks:
      h.remove()
  return logits, outs


def images(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def check_logits(got, ref, what):
  err = float(np.max(np.abs(got - ref)))
  assert err <= golden.logits_tol(ref), f"{what}: logits max|diff| {err:.3g} > {golden.logits_tol(ref):.3g}"
  print(f"{what}: logits max|diff| {err:.2g} (max|logits| {np.max(np.abs(ref)):.3g})")
  return err


def grad_tol(ref: np.ndarray) -> float:
  """Gradients sum over batch x tokens (x tokens) products in float32, in another order in each framework
  (and XLA:CPU's partitioning of a reduction can change between runs): measured up to 1.1e-5 of the largest
  entry (DeepViT's BN-scale gradient), so 5e-5 of it. A wrong backward is off by O(1) of it."""
  return 5e-5 * max(1.0, float(np.max(np.abs(ref))))


def check_block(got, ref, what, tol=golden.block_tol):
  got = np.asarray(got)
  assert got.shape == ref.shape, f"{what}: shape {got.shape} vs reference {ref.shape}"
  err = float(np.max(np.abs(got - ref)))
  assert err <= tol(ref), f"{what}: max|diff| {err:.3g} > {tol(ref):.3g}"
  print(f"{what}: max|diff| {err:.2g} (max|ref| {np.max(np.abs(ref)):.3g})")
  return err


# ---------------------------------------------------------------------------------------------------------
# The references reproduce the official code (golden files).


@pytest.mark.parametrize("case", ["evit_k07_fuse", "evit_k05_fuse", "evit_k07_nofuse"])
def test_evit_reference_matches_golden(case):
  meta, state, out = golden.load(case)
  kw = meta["constructor"]["kwargs"]
  ref = reference_for(EVIT, img_size=kw["img_size"], patch_size=kw["patch_size"], num_classes=kw["num_classes"],
                      embed_dim=kw["embed_dim"], depth=kw["depth"], num_heads=kw["num_heads"],
                      keep_rate=[float(r) for r in kw["keep_rate"]], keep_rate_blocks=None,
                      fuse_token=kw["fuse_token"])
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  ref.eval()
  logits, blocks = torch_run(ref, golden.nhwc(out["__input__"]), dict(enumerate(ref.blocks)))
  check_logits(logits, out["__logits__"], case)
  for i, blk in enumerate(ref.blocks):
    check_block(blocks[i], out[f"__block_out__.{i}"], f"{case} block {i}")
    if f"__evit_idx__.{i}" in out:
      idx, scores = blk.selection
      np.testing.assert_array_equal(idx.numpy(), out[f"__evit_idx__.{i}"])
      check_block(scores.numpy(), out[f"__evit_cls_attn__.{i}"], f"{case} scores {i}")
    else:
      assert blk.selection is None


def test_shunted_reference_matches_golden():
  meta, state, out = golden.load("shunted")
  kw = meta["constructor"]["kwargs"]
  assert kw["norm_layer"]["kwargs"]["eps"] == 1e-6
  ref = RefShunted(**{k: kw[k] for k in ("num_classes", "embed_dims", "depths", "num_heads", "mlp_ratios",
                                         "sr_ratios", "num_conv", "qkv_bias")}, norm_eps=1e-6)
  assert list(ref.state_dict()) == meta["state_dict"]["keys_in_order"]   # official registration order
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  ref.eval()
  blocks = {f"block{s}.{j}": b for s in range(1, 5) for j, b in enumerate(getattr(ref, f"block{s}"))}
  logits, outs = torch_run(ref, golden.nhwc(out["__input__"]), blocks)
  check_logits(logits, out["__logits__"], "shunted")
  for key, value in outs.items():
    check_block(value, out[f"__block_out__.{key}"], key)


# ---------------------------------------------------------------------------------------------------------
# EViT: keep rates, block positions, fusion, non-square images, the no-op, other backbones.

# name -> (registered name, overrides, input (B, H, W), input seed, expected token count after each block)
EVIT_CASES = {
    # the first block and two consecutive ones; 65 -> ceil(57.6)=58+2 -> ceil(53.1)=54+2 -> ceil(49.5)=50+2
    "k09_blocks012_fuse": (EVIT, dict(img_size=32, patch_size=4, keep_rate=0.9, keep_rate_blocks=(0, 1, 2),
                                      fuse_token=True), (2, 32, 32), 6, [60, 56, 52, 52]),
    # non-square 32 x 48 at patch 8: 4 x 6 = 24 patches; ceil(14.4)=15+1, ceil(9.0)=9+1
    "k06_32x48_p8_nofuse": (EVIT, dict(img_size=(32, 48), patch_size=8, keep_rate=0.6, keep_rate_blocks=(1, 2),
                                       fuse_token=False), (3, 32, 48), 1, [25, 16, 10, 10]),
    # non-square 48 x 32 at patch 4: 12 x 8 = 96 patches; the first and the last block: 48+2, ceil(24.5)=25+2
    "k05_48x32_blocks03_fuse": (EVIT, dict(img_size=(48, 32), patch_size=4, keep_rate=0.5,
                                           keep_rate_blocks=(0, 3), fuse_token=True), (2, 48, 32), 4,
                                [50, 50, 50, 27]),
    # three consecutive at 0.3, the fused token re-scored twice: ceil(19.2)=20+2, ceil(6.3)=7+2, ceil(2.4)=3+2
    "k03_blocks123_fuse": (EVIT, dict(img_size=32, patch_size=4, keep_rate=0.3, keep_rate_blocks=(1, 2, 3),
                                      fuse_token=True), (2, 32, 32), 3, [65, 22, 9, 5]),
    # 32 x 24 at patch 8: 12 patches. Block 1: ceil(0.95 * 12) = 12 = N - 1, nothing dropped and no fused token
    # made; then per-block rates 0.5 and 0.3: ceil(6.0)=6+1, ceil(1.8)=2+1
    "noop_then_k05_k03_32x24_p8_nofuse": (EVIT, dict(img_size=(32, 24), patch_size=8,
                                                     keep_rate=(1.0, 0.95, 0.5, 0.3), keep_rate_blocks=None,
                                                     fuse_token=False), (2, 32, 24), 5, [13, 13, 7, 3]),
    # EViT on AugViT (circulant2 augmented shortcuts read the full-length LN output): 80 -> 48+2 -> 30+2
    "augvit_circulant2_k06_40x32_fuse": ("augvit_small_circulant2",
                                         dict(img_size=(40, 32), patch_size=4, keep_rate=0.6,
                                              keep_rate_blocks=(1, 2), fuse_token=True), (2, 40, 32), 8,
                                         [81, 50, 32, 32]),
    # EViT on AttnScale (scores from the softmax map before the AttnScale reweighting): ceil(11.2)=12+1, 9+1
    "attnscale_k07_p8_nofuse": ("attnscale_small_12", dict(img_size=32, patch_size=8, keep_rate=0.7,
                                                           keep_rate_blocks=(0, 2), fuse_token=False),
                                (2, 32, 32), 7, [13, 13, 10, 10]),
}

# Kept order is the order of the scores; a near tie could legitimately flip between two float32 programs.
MIN_SCORE_GAP = 1e-6


@pytest.mark.parametrize("case", sorted(EVIT_CASES))
def test_evit_matches_reference(case):
  name, overrides, (b, h, w), seed, counts = EVIT_CASES[case]
  kw = dict(TINY_VIT, **overrides)
  model = numpy_init(nnx.eval_shape(lambda: create_model(name, **kw)), seed=10 + seed)
  ref = torch_model(reference_for(name, **kw), model)
  x = images((b, h, w, 3), seed)
  logits, inter = jax_run(model, x)
  ref_logits, ref_blocks = torch_run(ref, x, dict(enumerate(ref.blocks)))
  check_logits(logits, ref_logits, case)
  assert [t.shape[1] for t in inter["tokens"]] == counts
  for i, blk in enumerate(ref.blocks):
    check_block(inter["tokens"][i], ref_blocks[i], f"{case} block {i}")   # kept order and fused token too
    ours = inter["reorg"][i]
    if blk.selection is None:
      assert ours is None, f"{case} block {i}: reorganised, the reference did not"
      continue
    assert ours is not None, f"{case} block {i}: the reference reorganised, we did not"
    ref_idx, ref_scores = (t.numpy() for t in blk.selection)
    check_block(ours["cls_attn"], ref_scores, f"{case} scores {i}")
    k = ref_idx.shape[1]
    top = -np.sort(-ref_scores, axis=1)[:, :k + 1]
    gap = float(np.min(top[:, :-1] - top[:, 1:]))
    assert gap > MIN_SCORE_GAP, f"{case} block {i}: scores {gap:.2g} apart, top-k order ambiguous; change the seed"
    np.testing.assert_array_equal(np.asarray(ours["idx"]), ref_idx, err_msg=f"{case} block {i}")


# ---------------------------------------------------------------------------------------------------------
# Shunted: non-square and odd sizes, other depths/widths/stems, batch > 1.

GOLDEN_CFG = dict(embed_dims=(64, 32, 48, 64), depths=(1, 1, 2, 1), num_heads=(2, 2, 2, 4), mlp_ratios=(4, 4, 2, 2),
                  num_conv=1, num_classes=10)
OTHER_CFG = dict(embed_dims=(64, 64, 96, 128), depths=(2, 1, 2, 2), num_heads=(2, 4, 4, 8), mlp_ratios=(2, 3, 2, 4),
                 num_conv=2, qkv_bias=False, num_classes=7)
# name -> (overrides of shunted_s, inputs [(B, H, W), ...], expected stage grids per input)
SHUNTED_CASES = {
    # the golden configuration at a non-square size, and at odd sizes everywhere: 7x7/2 pad 3 on 67 x 99 ->
    # 34 x 50, 2x2/2 -> 17 x 25 (the reduction convs drop the remainder: 2 x 3 and 4 x 6 keys), then 3x3/2
    # pad 1 -> 9 x 13 -> 5 x 7 -> 3 x 4
    "golden_cfg": (GOLDEN_CFG, [(2, 64, 96), (3, 67, 99)], [[(16, 24), (8, 12), (4, 6), (2, 3)],
                                                            [(17, 25), (9, 13), (5, 7), (3, 4)]]),
    # other widths, depths, head counts and MLP ratios, two extra stem convs, no q/kv bias, small variances
    # into the eps-1e-5 LayerNorms; 42 x 74 -> 21 x 37 -> 10 x 18 (stage 1), then 5 x 9 -> 3 x 5 -> 2 x 3
    "other_cfg": (OTHER_CFG, [(2, 42, 74)], [[(10, 18), (5, 9), (3, 5), (2, 3)]]),
}


def shrink_eps_1e5_norm_inputs(model, factor):
  """Scale the convs that feed the LayerNorms with eps 1e-5 (patch embeddings, reduction paths) so that the
  normalised variances are ~1e-4 and the epsilon visibly matters (1e-6 there would change the outputs by
  several per cent)."""
  convs = [model.patch_embed1.conv[-1]] + [getattr(model, f"patch_embed{i}").proj for i in range(2, 5)]
  for s in range(1, 5):
    convs += [getattr(blk.attn, n) for blk in getattr(model, f"block{s}") for n in ("sr1", "sr2")
              if hasattr(blk.attn, n)]
  for conv in convs:
    for p in (conv.kernel, conv.bias):
      p.set_value(p[...] * factor)


@pytest.mark.parametrize("case", sorted(SHUNTED_CASES))
def test_shunted_matches_reference(case):
  overrides, inputs, grids = SHUNTED_CASES[case]
  model = numpy_init(nnx.eval_shape(lambda: create_model("shunted_s", **overrides)), seed=len(case))
  if case == "other_cfg":
    shrink_eps_1e5_norm_inputs(model, 0.01)
  ref = torch_model(shunted_reference_for("shunted_s", **overrides), model)
  blocks = {f"block{s}.{j}": blk for s in range(1, 5) for j, blk in enumerate(getattr(ref, f"block{s}"))}
  for (b, h, w), grid in zip(inputs, grids):
    what = f"{case} {h}x{w}"
    x = images((b, h, w, 3), seed=b * h + w)
    logits, inter = jax_run(model, x)
    ref_logits, ref_blocks = torch_run(ref, x, blocks)
    assert [tuple(int(v) for v in g) for g in inter["grids"]] == grid
    assert logits.shape == (b, overrides["num_classes"])
    check_logits(logits, ref_logits, what)
    assert sorted(inter["stage_tokens"]) == sorted(ref_blocks)
    for key, value in ref_blocks.items():
      check_block(inter["stage_tokens"][key], value, f"{what} {key}")


# ---------------------------------------------------------------------------------------------------------
# DeepViT in train mode: re-attention's BatchNorm normalises with batch statistics and updates its running
# statistics, and the head mixing (a 1x1 conv in the official code; here a conv forward with hand-written
# batched-matmul gradients, `attention.mix_heads_1x1`) must have the same gradients. The golden files only hold eval-mode outputs.


def test_deepvit_train_mode_matches_reference():
  kw = dict(TINY_VIT, img_size=32, patch_size=8, drop_path_rate=0.0)
  model = numpy_init(nnx.eval_shape(lambda: create_model("deepvit_patch16_224_re_attn_16b", **kw)), seed=3)
  ref = torch_model(reference_for("deepvit_patch16_224_re_attn_16b", **kw), model).train()
  x = images((3, 32, 32, 3), 4)
  weights = np.random.default_rng(5).standard_normal((3, kw["num_classes"])).astype(np.float32)

  def loss(model, x):
    return jax.numpy.sum(model(x) * weights), model(x)

  model.train()
  with jax.default_matmul_precision("highest"):
    (_, logits), (grads, dx) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(model, x)
  # value_and_grad ran the model twice (loss and aux): the running statistics moved twice, as in torch below.
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_(True)
  ref(xt)
  ref_logits = ref(xt)
  (ref_logits * torch.from_numpy(weights)).sum().backward()
  check_logits(np.asarray(logits), ref_logits.detach().numpy(), "deepvit train mode")
  check_block(np.asarray(dx).transpose(0, 3, 1, 2), xt.grad.numpy(), "d loss / d image", tol=grad_tol)
  for i, blk in enumerate(ref.blocks):
    ours = model.blocks[i].attn
    check_block(ours.var_norm.mean[...], blk.attn.var_norm.running_mean.numpy(), f"block {i} BN running mean")
    check_block(ours.var_norm.var[...], blk.attn.var_norm.running_var.numpy(), f"block {i} BN running var")
    g = np.asarray(grads.blocks[i].attn.reatten_matrix.kernel[...])[0, 0].T         # (out, in)
    check_block(g, blk.attn.reatten_matrix.weight.grad.numpy()[:, :, 0, 0], f"block {i} d loss / d reatten W",
                tol=grad_tol)
    check_block(np.asarray(grads.blocks[i].attn.var_norm.scale[...]), blk.attn.var_norm.weight.grad.numpy(),
                f"block {i} d loss / d BN scale", tol=grad_tol)
