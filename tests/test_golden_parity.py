"""Parity with the official PyTorch code: every golden case of tests/data/golden, fp32, eval mode."""
import jax
import numpy as np
import pytest

from tests import golden
from vit_jax_fix.interop import from_official_constructor, from_torch_state_dict, to_torch_state_dict

CASES = golden.cases()


def build(case, **overrides):
  meta, state, outputs = golden.load(case)
  model = from_official_constructor(golden.registered_name(meta), overrides=overrides,
                                    **meta["constructor"]["kwargs"])
  from_torch_state_dict(model, state)
  model.eval()
  return meta, state, outputs, model


@pytest.mark.parametrize("case", CASES)
def test_logits_and_blocks_match_official(case):
  meta, state, outputs, model = build(case)
  x = golden.nhwc(outputs["__input__"])
  with jax.default_matmul_precision("highest"):
    logits, inter = model(x, return_intermediates=True)
  ref = outputs["__logits__"]
  np.testing.assert_array_less(np.max(np.abs(np.asarray(logits) - ref)), golden.logits_tol(ref))
  ref_pre = outputs["__pre_logits__"]
  np.testing.assert_array_less(np.max(np.abs(np.asarray(inter["pre_logits"]) - ref_pre)),
                               golden.block_tol(ref_pre))
  blocks = inter["tokens"]
  for key, ref_block in outputs.items():
    if key.startswith("__block_out__."):
      suffix = key[len("__block_out__."):]
      got = blocks[int(suffix)] if suffix.isdigit() else inter["stage_tokens"][suffix]
    elif key.startswith("__cls_block_out__."):
      got = inter["cls_tokens"][int(key.rsplit(".", 1)[1])]
    elif key.startswith("__evit_idx__."):
      got = inter["reorg"][int(key.rsplit(".", 1)[1])]["idx"]
      np.testing.assert_array_equal(np.asarray(got), ref_block, err_msg=key)
      continue
    elif key.startswith("__evit_cls_attn__."):
      got = inter["reorg"][int(key.rsplit(".", 1)[1])]["cls_attn"]
    else:
      continue
    err = np.max(np.abs(np.asarray(got) - ref_block))
    assert err <= golden.block_tol(ref_block), f"{key}: max|diff| {err:.3g}"


@pytest.mark.parametrize("case", [c for c in CASES if c != "shunted"])
def test_unrolled_blocks_keep_parity(case):
  """scan_blocks=False runs the blocks as a Python loop (the default scans runs of identical blocks):
  same function, same weights."""
  meta, state, outputs, model = build(case, scan_blocks=False)
  with jax.default_matmul_precision("highest"):
    logits, inter = model(golden.nhwc(outputs["__input__"]), return_intermediates=True)
  ref = outputs["__logits__"]
  assert np.max(np.abs(np.asarray(logits) - ref)) <= golden.logits_tol(ref)
  last = max(int(k.rsplit(".", 1)[1]) for k in outputs if k.startswith("__block_out__."))
  ref_block = outputs[f"__block_out__.{last}"]
  assert np.max(np.abs(np.asarray(inter["tokens"][last]) - ref_block)) <= golden.block_tol(ref_block)


@pytest.mark.parametrize("case", CASES)
def test_state_dict_round_trip_is_exact(case):
  meta, state, outputs, model = build(case)
  back = to_torch_state_dict(model)
  assert sorted(back) == sorted(state)
  for key, value in state.items():
    assert back[key].dtype == value.dtype, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)
