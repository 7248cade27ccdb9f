"""benchmarks/llm_quality.py's sweep order: seeds run at the rate the grid chose, also within one invocation."""

import argparse
import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_quality.py"


@pytest.fixture()
def llm_quality():
    spec = importlib.util.spec_from_file_location("llm_quality_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(out: Path, phase: str, jobs: int = 1) -> argparse.Namespace:
    return argparse.Namespace(out=str(out), phase=phase, lrs="", summary_only=False, jobs=jobs)


def _fake_runs(module, monkeypatch, validation: dict[float, float], delay: float = 0.0) -> list:
    """run_one writes a run file whose validation accuracy is ``validation[lr]``; returns the runs in order."""
    ran, lock = [], threading.Lock()

    def run_one(args, arm, lr, seed):
        time.sleep(delay)
        result = {"metrics": {"validation": {"acc": validation[lr], "acc_norm": 0.0, "answer_nll": 1.0}}}
        (Path(args.out) / f"{module.run_name(arm, lr, seed)}.json").write_text(json.dumps(result))
        with lock:
            ran.append((arm, lr, seed))
        return result

    monkeypatch.setattr(module, "run_one", run_one)
    return ran


def test_phase_all_runs_the_seeds_at_the_rate_the_grid_just_chose(tmp_path, monkeypatch, llm_quality):
    grid = llm_quality.GRIDS["lora"]
    ran = _fake_runs(llm_quality, monkeypatch, {grid[0]: 0.30, grid[1]: 0.45, grid[2]: 0.40})
    llm_quality.run_sweep(_args(tmp_path, "all"), ["lora"])
    assert sorted(ran[:3]) == sorted(("lora", lr, 0) for lr in grid)
    assert ran[3:] == [("lora", grid[1], 1), ("lora", grid[1], 2)]  # not grid[0], the rate before any ran


def test_parallel_jobs_run_every_run_once_and_seeds_only_after_the_grid(tmp_path, monkeypatch, llm_quality):
    lora, mask = llm_quality.GRIDS["lora"], llm_quality.GRIDS["mask"]
    rates = {lora[0]: 0.2, lora[1]: 0.3, lora[2]: 0.5, mask[0]: 0.6, mask[1]: 0.4, mask[2]: 0.1}
    ran = _fake_runs(llm_quality, monkeypatch, rates, delay=0.05)
    llm_quality.run_sweep(_args(tmp_path, "all", jobs=4), ["lora", "fish"])
    assert len(ran) == len(set(ran)) == 10
    assert {run[2] for run in ran[:6]} == {0}
    assert sorted(ran[6:]) == sorted([("lora", lora[2], 1), ("lora", lora[2], 2),
                                      ("fish", mask[0], 1), ("fish", mask[0], 2)])
