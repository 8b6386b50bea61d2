"""Every command in README.md is exercised: the quickstart runs for real, every other command must parse."""
import argparse
import importlib
import re
import shlex
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, synthetic_image

README = (REPO / "README.md").read_text()


def bash_commands(text: str) -> list[str]:
    """Commands of the ```bash blocks, backslash continuations joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def script_argv(command: str) -> tuple[str, list[str]] | None:
    """('kdsr', [...args]) for `python kdsr.py ...` or `torchrun ... kdsr.py ...`; None for other commands."""
    words = shlex.split(command)
    for i, word in enumerate(words):
        if word.endswith(".py") and words[0] in ("python", "torchrun"):
            return word[:-3], words[i + 1:]
    return None


class Parsed(Exception):
    """Raised instead of running the command once argparse has accepted it."""


def test_install_and_test_commands_are_the_ci_ones():
    commands = bash_commands(README)
    assert commands[:2] == ["pip install -r requirements.txt", "python -m pytest tests -q"]
    assert "<!-- test-command -->\n```bash\npython -m pytest tests -q" in README


@pytest.mark.parametrize("command", [c for c in bash_commands(README) if script_argv(c)])
def test_every_readme_command_parses(command, monkeypatch):
    name, argv = script_argv(command)
    module = importlib.import_module(name)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed):
        module.main(argv)


def quickstart_commands() -> list[str]:
    block = README.split("<!-- quickstart -->", 1)[1]
    return bash_commands(block[: block.index("```", block.index("```bash") + 7) + 3])


def test_quickstart_runs(tmp_path, monkeypatch, bench_root):
    """The 5-minute quickstart, verbatim, on a folder of 'your photos' and the real Set5."""
    photos = tmp_path / "my_photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(synthetic_image(i, 200, 240)).save(photos / f"photo{i}.jpg", quality=95)
    (tmp_path / "datasets").mkdir()
    shutil.copytree(bench_root / "Set5", tmp_path / "datasets" / "Set5")
    monkeypatch.chdir(tmp_path)
    commands = quickstart_commands()
    assert len(commands) >= 3
    for command in commands:
        name, argv = script_argv(command)
        importlib.import_module(name).main(argv)
    results = next(tmp_path.glob("runs/**/results.csv")).read_text()
    psnr = [float(line.split(",")[3]) for line in results.splitlines()[1:] if ",mean," in line]
    assert len(psnr) == 2 and all(np.isfinite(psnr))
