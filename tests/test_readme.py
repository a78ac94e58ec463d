"""Every command in README.md is exercised: the set-up commands by CI (`.ci/run` runs the test command and
the main job), the library's CLIs by their own end-to-end tests, and here each documented command line is
parsed exactly as written (config files, config arguments and `--config.*` overrides validated; CLI
arguments accepted by the tool's parser), so the README cannot drift from the code."""
import pathlib
import re
import shlex

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
  """`python ...` command lines of the README's bash blocks (continuation lines joined, comments dropped)."""
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
    block = block.replace("\\\n", " ")
    for line in block.splitlines():
      line = line.split(" #")[0].strip()
      for part in line.split("&&"):
        part = part.strip()
        if part.startswith("python "):
          commands.append(part)
  return commands


COMMANDS = readme_commands()


def test_readme_has_the_two_setup_commands_and_ci_runs_them():
  ci = (ROOT / ".ci" / "run").read_text()
  assert 'pip install -e ".[test]" && python -m pytest -n 2 -q' in README
  assert 'pip install -q -e ".[test]" && python -m pytest -n 2 -q' in ci
  main_job = "python main.py --config configs/augvit_s.py:demo --workdir workdirs/augvit_demo"
  assert main_job in README and main_job in ci


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python main.py")])
def test_main_commands_parse_and_validate(command, monkeypatch):
  from vit_jax_fix.train import config as train_config
  monkeypatch.chdir(ROOT)
  argv = shlex.split(command)[1:]
  monkeypatch.setattr("sys.argv", argv)   # config_flags reads the --config.* overrides from sys.argv
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  fv(argv)
  assert fv.workdir
  train_config.validate(fv.config)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m vit_jax_fix.")])
def test_tool_commands_parse(command):
  import importlib
  argv = shlex.split(command)
  module = importlib.import_module(argv[2])
  parser = module.build_parser()
  parser.parse_args(argv[3:])
