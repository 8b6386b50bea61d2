"""Conventions every script keeps (DESIGN.md): line budget, banners, side-effect-free import, --help,
torch-only networks, honest `# Copied from` blocks, deviations documented in the README."""
import ast
import re
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = [name for name in ("kdsr", "mrda", "redsr", "pdm_sr", "craft_dist") if (REPO / f"{name}.py").exists()]
BANNERS = ["1. Config", "2. Degradation", "3. Networks", "4. Losses", "5. Training", "6. Evaluation",
           "7. Official weights", "8. CLI"]


def source(name: str) -> str:
    return (REPO / f"{name}.py").read_text()


def test_every_script_exists():
    assert SCRIPTS == ["kdsr", "mrda", "redsr", "pdm_sr", "craft_dist"]


# common.py: 450 lines for IO, data, protocol, metrics and run utilities, plus the tiled-inference, stop-signal
# and finite-loss helpers every training loop shares (~35 lines); each script: 900 (DESIGN.md)
@pytest.mark.parametrize("name, cap", [("common", 510)] + [(s, 900) for s in SCRIPTS])
def test_line_budget(name, cap):
    assert len(source(name).splitlines()) <= cap


@pytest.mark.parametrize("name", SCRIPTS)
def test_banners_in_order(name):
    found = re.findall(r"^# ---- (\d\. [A-Za-z ]+?) -*$", source(name), flags=re.M)
    assert found == BANNERS


@pytest.mark.parametrize("name", SCRIPTS + ["common"])
def test_import_has_no_side_effects(name, tmp_path):
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); import {name}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", SCRIPTS + ["common"])
def test_help_works(name, capsys):
    module = __import__(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def module_classes(tree):
    return [node for node in tree.body if isinstance(node, ast.ClassDef)
            and any("Module" in ast.unparse(base) for base in node.bases)]


@pytest.mark.parametrize("name", SCRIPTS)
def test_networks_depend_on_torch_only(name):
    tree = ast.parse(source(name))
    for cls in module_classes(tree):
        names = {n.id for n in ast.walk(cls) if isinstance(n, ast.Name)}
        assert not names & {"common", "np", "numpy", "Config", "args"}, cls.name


def definitions(name: str) -> dict:
    text = source(name)
    return {node.name: ast.get_source_segment(text, node) for node in ast.parse(text).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("name", SCRIPTS)
def test_copied_blocks_are_identical(name):
    text = source(name)
    mine = definitions(name)
    for origin, symbol in re.findall(r"# Copied from (\w+)\.py:(\w+)", text):
        assert symbol in mine, f"{name}.py marks {symbol} as copied but does not define it"
        assert mine[symbol] == definitions(origin)[symbol], f"{name}.py:{symbol} differs from {origin}.py"


def readme_section(name: str) -> str:
    """The README section headed '## `<name>.py` ...', up to the next '## ' heading."""
    match = re.search(rf"^## `{name}\.py`.*?(?=^## |\Z)", (REPO / "README.md").read_text(), flags=re.M | re.S)
    assert match, f"README has no section for {name}.py"
    return match.group(0)


@pytest.mark.parametrize("name", SCRIPTS)
def test_deviations_are_in_readme(name):
    section = readme_section(name)
    if "[DEV]" in source(name):
        assert "Deviations" in section, f"README section of {name}.py lists no deviations"
