"""Every command in README.md (and the docs/ pages it links) is exercised: the set-up commands by CI (`.ci/run` runs the test command and
the main job), the library's CLIs by their own end-to-end tests, and here each command line the README shows,
in code blocks and in the prose alike, is parsed exactly as written: main.py's through main.py's own flag
parser (config files, config arguments and `--config.*` overrides loaded and validated), the tools' through
their argument parsers, scripts by their path and flags. `--config.*` fragments given in the prose are applied
to a config. So the README cannot drift from the code."""
import pathlib
import re
import shlex

import pytest
from absl import flags

from vit_jax_fix.train import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# The README's commands and those of the pages it links for the long explanations.
DOCS = "\n".join([README] + [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))])
PLACEHOLDER_VALUES = {"N": "1", "K": "1"}   # `--config.diagnostics.every_steps=N` in the prose


def readme_commands() -> list[str]:
  """`python ...` command lines of the README: bash blocks (continuation lines joined, comments dropped) and
  inline code spans of the prose."""
  commands = []
  blocks = re.findall(r"```bash\n(.*?)```", DOCS, flags=re.S)
  for block in blocks:
    block = block.replace("\\\n", " ")
    for line in block.splitlines():
      line = line.split(" #")[0].strip()
      for part in line.split("&&"):
        part = part.strip()
        if part.startswith("python "):
          commands.append(part)
  prose = re.sub(r"```.*?```", "", DOCS, flags=re.S)
  commands += [c.strip() for c in re.findall(r"`(python [^`]+)`", prose)]
  return commands


def readme_override_fragments() -> list[str]:
  """Inline code spans of the prose made only of `--config.KEY=VALUE` overrides."""
  prose = re.sub(r"```.*?```", "", DOCS, flags=re.S)
  spans = re.findall(r"`([^`]+)`", prose)
  return [s for s in spans if all(t.startswith("--config.") for t in s.split()) and "KEY=VALUE" not in s]


COMMANDS = readme_commands()
FRAGMENTS = readme_override_fragments()


def parse_main(argv: list[str], monkeypatch):
  """main.py's flag parsing (cli.define_main_flags + cli.parse_flags) on fresh flag values."""
  monkeypatch.chdir(ROOT)
  fv = flags.FlagValues()
  cli.define_main_flags(fv, sys_argv=["main.py", *argv])
  cli.parse_flags(["main.py", *argv], fv)
  return fv


def test_readme_has_the_two_setup_commands_and_ci_runs_them():
  ci = (ROOT / ".ci" / "run").read_text()
  tests = 'pip install -e ".[test]" -c constraints.txt && python -m pytest -n 2 -q'
  assert tests in README and tests.replace("install -e", "install -q -e") in ci
  main_job = ('pip install -e ".[cpu]" -c constraints.txt && '
              "python main.py --config configs/augvit_s.py:demo --workdir workdirs/augvit_demo")
  assert main_job in README and main_job in ci


def test_prose_commands_are_collected():
  """The collector sees the prose: every inline `python ...` span of the README is among COMMANDS."""
  inline = re.findall(r"`(python [^`]+)`", re.sub(r"```.*?```", "", DOCS, flags=re.S))
  assert inline and all(c.strip() in COMMANDS for c in inline)
  assert FRAGMENTS, "the README shows --config.* overrides in its prose"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python main.py")])
def test_main_commands_parse_and_validate(command, monkeypatch):
  fv = parse_main(shlex.split(command)[2:], monkeypatch)
  assert fv.workdir and fv.config.model.name


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_prose_overrides_apply_to_a_config(fragment, monkeypatch):
  overrides = []
  for token in shlex.split(fragment):
    key, _, value = token.partition("=")
    overrides.append(f"{key}={PLACEHOLDER_VALUES.get(value, value)}")
  fv = parse_main(["--config", "configs/deit_s.py:demo", "--workdir", "W", *overrides], monkeypatch)
  for token in overrides:
    path, _, _ = token[len("--config."):].partition("=")
    node = fv.config
    for key in path.split("."):
      assert key in node, f"{token}: {key!r} did not reach the config"
      node = node[key]


def parse_evaluate(argv: list[str], monkeypatch):
  """`python -m vit_jax_fix.evaluate`'s absl flags (evaluate.define_flags + cli.parse_flags) on fresh flag
  values: config loaded, overrides validated, one weights source, keep rates numbers."""
  from vit_jax_fix import evaluate
  monkeypatch.chdir(ROOT)
  fv = flags.FlagValues()
  evaluate.define_flags(fv, sys_argv=["evaluate", *argv])
  cli.parse_flags(["evaluate", *argv], fv)
  evaluate.source_from_flags(fv)
  evaluate.keep_rates_from_flags(fv)
  return fv


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m vit_jax_fix.evaluate ")])
def test_evaluate_commands_parse_and_validate(command, monkeypatch):
  fv = parse_evaluate(shlex.split(command)[3:], monkeypatch)
  assert fv.config.model.name


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m vit_jax_fix.")
                                     and not c.startswith("python -m vit_jax_fix.evaluate ")])
def test_tool_commands_parse(command):
  import importlib
  argv = shlex.split(command)
  module = importlib.import_module(argv[2])
  parser = module.build_parser()
  parser.parse_args(argv[3:])


@pytest.mark.parametrize("command", [c for c in COMMANDS if re.match(r"python [\w/]+\.py", c)
                                     and not c.startswith("python main.py")])
def test_script_commands_exist_with_their_flags(command):
  argv = shlex.split(command)
  script = ROOT / argv[1]
  assert script.is_file(), f"{command}: no {argv[1]}"
  source = script.read_text()
  for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
    assert re.search(rf"""["']{re.escape(flag)}["']""", source), f"{command}: {script.name} has no {flag}"
