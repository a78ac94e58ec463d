"""The command line as a user meets it: every model option from `--config.model.overrides.KEY=VALUE` (set in
the config file or not), strict keys elsewhere, and errors a user can fix ending with their message alone on
stderr and a non-zero exit (2 for usage and config), through main.py's own flag parser and real main.py runs."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from vit_jax_fix import errors
from vit_jax_fix.train import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ["--config", "configs/evit_s.py:demo", "--workdir", "W"]
MODEL_OPTIONS = ["--config.model.overrides.feat_scale=double", "--config.model.overrides.keep_rate=0.6",
                 "--config.model.overrides.keep_rate_blocks=(2,4)", "--config.model.overrides.dtype=bfloat16",
                 "--config.model.overrides.param_layout=per_block"]


def parse(argv, monkeypatch):
  monkeypatch.chdir(ROOT)
  fv = flags.FlagValues()
  cli.define_main_flags(fv, sys_argv=["main.py", *argv])
  cli.parse_flags(["main.py", *argv], fv)
  return fv.config


def test_any_model_option_from_the_command_line(monkeypatch):
  config = parse(DEMO + MODEL_OPTIONS, monkeypatch)
  ov = config.model.overrides
  assert "feat_scale" not in __import__("configs.evit_s", fromlist=["x"]).get_config("demo").model.overrides
  assert (ov.feat_scale, ov.keep_rate, tuple(ov.keep_rate_blocks), ov.dtype, ov.param_layout) == \
      ("double", 0.6, (2, 4), "bfloat16", "per_block")
  assert ov.embed_dim == 128   # the config file's own overrides stay


def test_model_option_typo_names_the_nearest(monkeypatch):
  with pytest.raises(errors.ConfigKeyError, match="'feat_scal'.*Did you mean 'feat_scale'"):
    parse(DEMO + ["--config.model.overrides.feat_scal=double"], monkeypatch)


@pytest.mark.parametrize("flag, message", [
    ("--config.batch_sise=8", "'batch_sise'.*Did you mean 'batch_size'"),
    ("--config.optimizer.weight_decy=0.1", "'optimizer.weight_decy'.*Did you mean 'weight_decay'"),
    ("--config.optimizr.lr=1", "'optimizr'.*Did you mean 'optimizer'"),
    ("--config.data.augmnet=deit", "'data.augmnet'.*Did you mean 'augment'"),
])
def test_other_sections_stay_strict(flag, message, monkeypatch):
  with pytest.raises(errors.ConfigKeyError, match=message):
    parse(DEMO + [flag], monkeypatch)


@pytest.mark.parametrize("value, expected", [("True", True), ("False", False), ("auto", "auto")])
def test_reinit_head_flag_gives_a_bool(value, expected, monkeypatch):
  """A str-typed key turned `--config.init_from.reinit_head=True` into the string 'True', which fine-tuning read
  as False (keep the source head)."""
  config = parse(DEMO + [f"--config.init_from.reinit_head={value}"], monkeypatch)
  assert config.init_from.reinit_head is expected if expected != "auto" else config.init_from.reinit_head == "auto"


@pytest.mark.parametrize("argv, error, message", [
    (["--config", "configs/deit_s.py:nope", "--workdir", "W"], errors.ConfigError, "unknown config argument 'nope'"),
    (["--config", "configs/missing.py", "--workdir", "W"], errors.UsageError, "could not be loaded"),
    (["--config", "configs/deit_s.py:demo"], errors.UsageError, "--workdir must have a value"),
    (DEMO + ["--config.batch_size=abc"], errors.UsageError, "batch_size=abc"),
    (DEMO + ["--config.optimizer.name=adam"], errors.ConfigError, "use 'adamw' or 'lamb'"),
    (DEMO + ["--config.init_from.reinit_head=maybe"], errors.ConfigError, "reinit_head='maybe'"),
])
def test_usage_errors_are_one_line_messages(argv, error, message, monkeypatch):
  with pytest.raises(error, match=message) as e:
    parse(argv, monkeypatch)
  assert "Traceback" not in str(e.value)


def _main(argv, tmp_path, **env):
  environ = {k: v for k, v in os.environ.items() if k != errors.DEBUG_ENV}
  environ.update(VIT_JAX_FIX_HUGEPAGES="0", TF_CPP_MIN_LOG_LEVEL="3", JAX_NUM_CPU_DEVICES="1", **env)
  return subprocess.Popen([sys.executable, "main.py", *argv], cwd=ROOT, env=environ, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_main_trains_two_steps_with_model_options_it_did_not_set(tmp_path):
  """A real main.py run: EViT demo with FeatScale, another keep rate and blocks, bf16 compute and the
  per-block layout, none of which the config file sets; the workdir records them and the run finishes."""
  wd = tmp_path / "run"
  p = _main(["--config", "configs/evit_s.py:demo", "--workdir", str(wd), "--config.total_steps=2",
             "--config.progress_bar=False", "--config.eval_batch_size=500", *MODEL_OPTIONS], tmp_path)
  out, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]
  assert "final eval top-1" in out
  saved = json.loads((wd / "config.json").read_text())["model"]["overrides"]
  assert (saved["feat_scale"], saved["keep_rate"], saved["keep_rate_blocks"], saved["dtype"],
          saved["param_layout"]) == ("double", 0.6, [2, 4], "bfloat16", "per_block")
  meta = json.loads((wd / "checkpoints" / "2" / "meta" / "metadata").read_text())
  assert meta["param_layout"] == "per_block" and meta["model_kwargs"]["dtype"] == "bfloat16"


@pytest.mark.slow
def test_user_errors_end_main_cleanly(tmp_path):
  """Run side by side: a config error (exit 2), data not prepared (exit 1), a non-finite loss (exit 1): one
  message on stderr, no traceback; VIT_JAX_FIX_DEBUG=1 shows it."""
  demo = ["--config", "configs/deit_s.py:demo", "--config.progress_bar=False", "--config.eval_batch_size=500"]
  runs = {
      "config": (_main(demo + ["--workdir", str(tmp_path / "a"), "--config.model.overrides.depht=2"], tmp_path),
                 2, "Did you mean 'depth'"),
      "data": (_main(demo + ["--workdir", str(tmp_path / "b"), "--config.data.dataset=imagenet2012",
                             f"--config.data.data_dir={tmp_path / 'tfds'}"], tmp_path), 1, "is not prepared"),
      "nan": (_main(demo + ["--workdir", str(tmp_path / "c"), "--config.total_steps=3",
                            "--config.debug_nan_at_step=2"], tmp_path), 1, "non-finite"),
      "debug": (_main(demo + ["--workdir", str(tmp_path / "d"), "--config.model.overrides.depht=2"], tmp_path,
                      VIT_JAX_FIX_DEBUG="1"), 1, "Traceback"),
  }
  for name, (p, code, text) in runs.items():
    out, err = p.communicate(timeout=600)
    assert p.returncode == code, (name, err[-3000:])
    assert text in err, (name, err[-3000:])
    if name in ("config", "data", "nan"):
      assert "Traceback" not in err, (name, err[-3000:])
      assert err.strip().splitlines()[-1].startswith("main.py: error: "), (name, err[-3000:])


def test_a_bug_keeps_its_traceback_and_debug_shows_user_errors(monkeypatch, capsys):
  """main.py's wrapper (cli.run -> errors.exit_on_user_error): a UserError anywhere in the exception chain is
  its message and exit code; any other exception propagates with its traceback."""
  def user():
    try:
      raise KeyError("inner")
    except KeyError as e:
      raise errors.MissingFileError("no such weights file: x.pth") from e

  def bug():
    raise RuntimeError("a bug")

  monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
  with pytest.raises(SystemExit) as e:
    errors.exit_on_user_error(user, prog="tool")()
  assert e.value.code == 1 and capsys.readouterr().err == "tool: error: no such weights file: x.pth\n"
  with pytest.raises(RuntimeError, match="a bug"):
    errors.exit_on_user_error(bug)()

  def bug_while_handling():
    try:
      user()
    except errors.UserError:
      bug()
  with pytest.raises(RuntimeError, match="a bug"):   # not reported as the user error it was handling
    errors.exit_on_user_error(bug_while_handling)()
  monkeypatch.setenv(errors.DEBUG_ENV, "1")
  with pytest.raises(errors.MissingFileError):
    errors.exit_on_user_error(user)()


def test_convert_and_diagnose_report_user_errors(tmp_path, capsys, monkeypatch):
  """The tools' mains: a misspelt model argument (diagnose) and a missing weights file (convert) are one line
  on stderr and exit 2 / 1, not a TypeError or FileNotFoundError traceback."""
  from vit_jax_fix import convert, diagnose
  monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
  with pytest.raises(SystemExit) as e:
    diagnose.main(["--model", "deit_tiny_patch16_224:img_size=32,patch_size=8,depht=2", "--out", str(tmp_path)])
  err = capsys.readouterr().err
  assert e.value.code == 2 and "diagnose: error:" in err and "Did you mean 'depth'" in err
  assert "Traceback" not in err
  with pytest.raises(SystemExit) as e:
    convert.main(["from-torch", "--name", "deit_tiny_patch16_224", "--weights", str(tmp_path / "nope.pth"),
                  "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert e.value.code == 1 and err.startswith("convert: error: no such weights file")
