"""benchmarks/llm_quality.py --probe-batch-sizes: each arm's training peak at two batch sizes and the slope."""

import argparse
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_quality.py"


def _load():
    spec = importlib.util.spec_from_file_location("llm_quality_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(model="m", task="a,b", data_dir="d", max_seq_length=256, batch_size=16, steps=200,
                              warmup_steps=20, fisher_samples=512, smoke=False, scratch=str(tmp_path),
                              probe_batch_sizes="4,8")


def test_probe_runs_each_trained_arm_at_each_batch_size_and_reports_the_slope(tmp_path, monkeypatch):
    module = _load()
    calls = []

    def fake_run(line, stdout, stderr, env, check):
        # argparse keeps the last of a repeated flag: the probe's batch size and step count must come last
        last = {flag: line[i + 1] for i, flag in enumerate(line[:-1]) if flag.startswith("--")}
        batch = int(last["--per-device-train-batch-size"])
        dropout = "--lora-dropout" in last
        calls.append((last["--method"], batch, last["--max-steps"], env["MALLOC_MMAP_THRESHOLD_"]))
        peak = 1000 + batch * (250 if dropout else 400)
        Path(last["--output-dir"], "results.json").write_text(json.dumps({"train_peak_rss_mb": peak}))

    monkeypatch.setattr(module.subprocess, "run", fake_run)
    markdown, probe = module.memory_probe(_args(tmp_path), ["zero-shot", "lora", "lora-nodropout"])

    assert calls == [("lora", 4, "3", "1048576"), ("lora", 8, "3", "1048576"),
                     ("lora", 4, "3", "1048576"), ("lora", 8, "3", "1048576")]  # zero-shot trains nothing
    assert probe["peak_rss_mb"] == {"lora": {4: 2600, 8: 4200}, "lora-nodropout": {4: 2000, 8: 3000}}
    assert probe["mb_per_sequence"] == {"lora": 400.0, "lora-nodropout": 250.0}
    assert "| lora-nodropout | 2000 | 3000 | 250 |" in markdown
    assert not list(tmp_path.iterdir())  # each probe's run folder is removed
