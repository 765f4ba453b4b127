"""Every `python train.py ...` / `python eval.py ...` line of the README's cookbook composes as
written; the lines that run offline on a CPU also run, with `debug=fast` (`-m slow`)."""

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from tests.conftest import CONFIG_DIR, ROOT, cli_command

ENTRY_POINTS = {"train.py": "train", "eval.py": "eval"}
# What a line's own comment says it needs, in the README's words.
NEEDS_WORDS = re.compile(r"\((GPU|needs weights)")
# A <placeholder> the user fills in (a run's time stamp): an example value, so the line parses.
PLACEHOLDER = re.compile(r"<(\w+)>")


@dataclass(frozen=True)
class Line:
    """One cookbook command: its entry point, overrides as written, and its comment."""

    text: str
    config_name: str
    overrides: tuple[str, ...]
    multirun: bool
    comment: str

    def __str__(self) -> str:
        return self.text


def cookbook_lines(readme: Path = ROOT / "README.md") -> list[Line]:
    """The README's cookbook block (the first ```bash block after '## Cookbook'), parsed."""
    block = readme.read_text().split("## Cookbook", 1)[1].split("```bash\n", 1)[1]
    lines = []
    for text in block.split("```", 1)[0].splitlines():
        words = shlex.split(PLACEHOLDER.sub(r"example_\1", text), comments=True)
        if len(words) < 2 or words[0] != "python" or words[1] not in ENTRY_POINTS:
            continue
        arguments = words[2:]
        command, _, comment = text.partition(" #")
        lines.append(
            Line(
                command.strip(),
                ENTRY_POINTS[words[1]],
                tuple(a for a in arguments if a not in ("-m", "--multirun")),
                "-m" in arguments or "--multirun" in arguments,
                comment.strip(),
            )
        )
    return lines


def first_of_each_sweep(overrides: tuple[str, ...]) -> list[str]:
    """A multirun's overrides with each sweep (`a=1,2`) cut to its first value: one job."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [
        f"{o.get_key_element()}={next(o.sweep_string_iterator())}"
        if o.is_sweep_override()
        else o.input_line
        for o in parsed
    ]


def compose_line(line: Line, extra: list[str] = ()) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(line.config_name, [*first_of_each_sweep(line.overrides), *extra])


def needs(line: Line, cfg: DictConfig) -> list[str]:
    """Why a line cannot run offline on this CPU (empty: it can)."""
    reasons = []
    if cfg.hardware.accelerator == "gpu" or cfg.engine._target_.endswith("VLLMEngine"):
        reasons.append("a GPU")
    model = cfg.model
    kit_made = model.get("tiny") is not None or model.get("build_with") is not None
    if model.get("_target_", "").endswith("load_causal_lm") and not kit_made:
        reasons.append(f"model weights ({model.path})")
    for name, source in data_sources(cfg.data).items():
        if not Path(source).is_file():
            reasons.append(f"data ({name}: {source})")
    if "<" in line.text:
        reasons.append("an earlier run (a <placeholder> in the line)")
    return reasons


def data_sources(data: DictConfig) -> dict[str, str]:
    """The `path` of every split that loads a table (synthetic splits have none)."""
    splits = {"train": data.get("train"), **(data.get("val") or {})}
    return {name: s.path for name, s in splits.items() if s is not None and "path" in s}


LINES = cookbook_lines()


def test_the_cookbook_is_found():
    assert len(LINES) >= 30 and LINES[0].text == "python train.py"


@pytest.mark.parametrize("line", LINES, ids=str)
def test_cookbook_line_composes(line, tmp_path):
    cfg = compose_line(line)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)  # what Hydra sets when it runs the line
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    reasons = needs(line, cfg)
    if NEEDS_WORDS.search(line.comment):  # the README says it needs a GPU or weights
        assert reasons, f"{line}: the README says '{line.comment}', but it looks runnable here"


@pytest.fixture(scope="module")
def shared_models(tmp_path_factory) -> Path:
    """One model directory for the whole cookbook: a base built once serves every line."""
    return tmp_path_factory.mktemp("cookbook_models")


@pytest.mark.slow
@pytest.mark.parametrize("line", LINES, ids=str)
def test_cookbook_line_runs_with_debug_fast(line, tmp_path, shared_models):
    """The line as written plus `debug=fast`; a base it builds is built with `debug=fast` too."""
    cfg = compose_line(line, ["debug=fast"])
    reasons = needs(line, cfg)
    if reasons:
        pytest.skip("needs " + "; ".join(reasons))
    overrides = [*first_of_each_sweep(line.overrides), "debug=fast"]
    if cfg.model.get("build_with") is not None:
        recipe = ",".join(f"'{o}'" for o in [*cfg.model.build_with, "debug=fast"])
        overrides.append(f"model.build_with=[{recipe}]")
    command, env = cli_command(*overrides, tmp_path=tmp_path)
    command[1] = str(ROOT / f"{line.config_name}.py")
    command[-1] = f"paths.model_dir={shared_models}"
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900
    )
    assert result.returncode == 0, (line.text, (result.stdout + result.stderr)[-4000:])


if __name__ == "__main__":  # list the lines and what each needs
    for line in LINES:
        reasons = needs(line, compose_line(line))
        print(f"{'composes' if reasons else 'runs here':10} {line.text}", file=sys.stdout)
        if reasons:
            print(f"{'':10} needs " + "; ".join(reasons))
