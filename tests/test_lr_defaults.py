"""benchmarks/lr_defaults.py's choice of a default rate, and the suite's length-grouped batches in llm_quality.py."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lr_defaults():
    return _load("lr_defaults")


def test_the_default_is_the_best_worst_case_over_the_tasks_that_learned(lr_defaults):
    ladder = (1e-3, 3e-3, 1e-2)
    by_task = {
        "a": {1e-3: 0.80, 3e-3: 0.90, 1e-2: 0.70},  # relative 0.89, 1.00, 0.78
        "b": {1e-3: 0.60, 3e-3: 0.50, 1e-2: 0.40},  # relative 1.00, 0.83, 0.67
        "unlearned": {1e-3: 0.10, 3e-3: 0.50, 1e-2: 0.50},  # below its bar: left out, else 3e-3's worst is 0.83
        "partial": {1e-3: 0.20},  # not every rate: left out
    }
    chosen, detail = lr_defaults.choose(by_task, ladder, {"unlearned": 0.55, "a": 0.5, "b": 0.3})
    assert chosen == 1e-3  # worst cases: 0.89, 0.83, 0.67
    assert detail["tasks"] == ["a", "b"] and detail["left_out"] == ["partial", "unlearned"]
    assert detail["rates"][3e-3]["worst"] == pytest.approx(0.5 / 0.6)
    assert detail["rates"][1e-3]["mean_rank"] == 1.5


def test_a_run_still_rising_on_validation_is_marked(lr_defaults):
    result = {"validation_log": [{"step": 10, "loss": 1.0, "pearson": 0.70}, {"step": 20, "loss": 0.9, "pearson": 0.75},
                                 {"step": 30, "loss": 0.8, "pearson": 0.78}]}
    assert lr_defaults.curve("stsb", result) == [0.70, 0.75, 0.78]
    assert lr_defaults.still_rising([0.70, 0.75, 0.78])  # +0.03 in the last epoch
    assert not lr_defaults.still_rising([0.70, 0.78, 0.782]) and not lr_defaults.still_rising([0.8])
    assert lr_defaults.curve("sst2", {"metrics": {}}) == []  # runs without --validation-curve


def test_each_familys_smollm2_points_come_from_an_arm_of_that_family(lr_defaults, tmp_path):
    """The random family once read the LLM sweep's "random" arm, which is IST's LoRA-on-random-blocks baseline:
    its losses were quoted as random entries' evidence for the default rate."""
    llm_quality = _load("llm_quality")
    for family, arm in lr_defaults.LLM_ARMS.items():
        if arm is not None:
            assert llm_quality.ARMS[arm][0] == family, (family, arm)
    assert "--layers" in llm_quality.ARMS["random"][1]  # the sweep's "random" is a choice of blocks, not of entries
    for arm, lr in (("random", 0.01), ("fish", 0.001)):
        (tmp_path / f"{arm}_lr{lr}_seed0.json").write_text(
            '{"learning_rate": %s, "metrics": {"validation": {"acc": 0.4}}}' % lr)
    assert lr_defaults.llm_points(tmp_path, "random") == {}
    assert lr_defaults.llm_points(tmp_path, "mask") == {0.001: 0.4}


def _write_seed0_runs(llm_quality, folder: Path, arm: str, validation: dict[float, float]) -> None:
    """Seed-0 run files of an arm with the given validation score (the rate rule's measure) at each rate."""
    for lr, score in validation.items():
        (folder / f"{llm_quality.run_name(arm, lr, 0)}.json").write_text(json.dumps(
            {"learning_rate": lr, "metrics": {"validation": {llm_quality.SELECT_ON: score, "acc_norm": 0.5,
                                                               "answer_nll": 1.0}}}))


def test_an_arm_whose_grid_moved_up_is_planned_and_chosen_on_its_own_grid(tmp_path):
    """Random entries' grid moved up a half-decade (their social_iqa grid peaked at its upper edge): the sweep runs
    the moved grid, the rate is chosen inside it, and the points it moved past are listed beside, never chosen."""
    llm_quality = _load("llm_quality")
    arm = "random-linear-lora8"
    assert llm_quality.grid_of(arm) == (1e-3, 3e-3, 1e-2) and llm_quality.off_grid_of(arm) == (1e-4, 3e-4)
    assert llm_quality.grid_of("fish-lora8") == llm_quality.GRIDS["mask"]  # the family's other arms keep theirs
    args = argparse.Namespace(phase="grid", lrs="", out=str(tmp_path), task="social_iqa")
    assert [lr for _, lr, _ in llm_quality.grid_plan(args, [arm])] == [1e-3, 3e-3, 1e-2]
    _write_seed0_runs(llm_quality, tmp_path, arm, {3e-4: 0.60, 1e-3: 0.40, 3e-3: 0.45})  # 3e-4 best, off the grid
    assert llm_quality.chosen_lr(args, arm) == 3e-3
    markdown, table = llm_quality.grid_table(args, [arm, "fish-lora8"])
    assert "mask family, grid moved up, seed 0 | lr 0.001 | lr 0.003 | lr 0.01 | chosen" in markdown
    assert f"| {arm} | 40.00 | 45.00 | not run | 0.003 | not run | 60.00 |" in markdown


def test_on_the_suite_every_selection_arm_is_searched_over_the_same_grid(tmp_path):
    """Random entries' grid moved up on social_iqa, not on the suite: there they share the mask family's three
    points with FISH and |w·g| (the same search for every arm), and their suite run at 1e-2 (from the moved grid)
    is listed beside the grid, never chosen."""
    llm_quality = _load("llm_quality")
    suite = "social_iqa,winowhy,timedial,epistemic_reasoning"
    arm = "random-linear-lora8"
    assert llm_quality.grid_of(arm, suite) == llm_quality.GRIDS["mask"] == llm_quality.grid_of("fish-lora8", suite)
    assert llm_quality.off_grid_of(arm, suite) == (1e-4, 1e-2)
    args = argparse.Namespace(phase="grid", lrs="", out=str(tmp_path), task=suite)
    assert [lr for _, lr, _ in llm_quality.grid_plan(args, [arm])] == [3e-4, 1e-3, 3e-3]
    _write_seed0_runs(llm_quality, tmp_path, arm, {1e-3: 0.49, 3e-3: 0.48, 1e-2: 0.55})  # 1e-2 best, off the grid
    assert llm_quality.chosen_lr(args, arm) == 1e-3
    markdown, _ = llm_quality.grid_table(args, [arm, "fish-lora8"])
    assert "grid moved up" not in markdown
    assert f"| {arm} | not run | 49.00 | 48.00 | 0.001 | not run | 55.00 |" in markdown


def test_random_entries_shuffled_grid_moved_up_on_the_suite_after_peaking_at_its_upper_edge(tmp_path):
    """In shuffled order random entries' suite validation peaked at the family grid's upper edge and again at the
    moved grid's, so by the grid rule their suite grid has moved up twice: 3e-2 is planned, the best point inside
    the grid is chosen (a better point it moved past is not), and 3e-4 and 1e-3 are listed beside. The Trainer-order
    arm keeps the family grid there, and a --task written with spaces finds the same grid."""
    llm_quality = _load("llm_quality")
    suite, arm = llm_quality.COMMONSENSE_SUITE, "random-linear-lora8-shuffled"
    assert llm_quality.grid_of(arm, suite) == (3e-3, 1e-2, 3e-2) == llm_quality.grid_of(arm, suite.replace(",", ", "))
    assert llm_quality.off_grid_of(arm, suite) == (1e-4, 3e-4, 1e-3)
    assert llm_quality.grid_of("random-linear-lora8", suite) == llm_quality.GRIDS["mask"]
    assert llm_quality.grid_of("fish-lora8-shuffled", suite) == llm_quality.GRIDS["mask"]
    args = argparse.Namespace(phase="grid", lrs="", out=str(tmp_path), task=suite)
    assert [lr for _, lr, _ in llm_quality.grid_plan(args, [arm])] == [3e-3, 1e-2, 3e-2]
    # 1e-3 scores best but the grid moved past it
    _write_seed0_runs(llm_quality, tmp_path, arm, {3e-4: 0.5025, 1e-3: 0.5600, 3e-3: 0.5230, 1e-2: 0.5487})
    assert llm_quality.chosen_lr(args, arm) == 1e-2
    markdown, _ = llm_quality.grid_table(args, [arm, "fish-lora8-shuffled"])
    assert "mask family, grid moved up, seed 0 | lr 0.003 | lr 0.01 | lr 0.03 | chosen" in markdown
    assert f"| {arm} | 52.30 | 54.87 | not run | 0.01 | not run | 50.25 | 56.00 |" in markdown


def test_a_grid_moved_in_shuffled_order_is_found_under_train_order_shuffled(tmp_path):
    """benchmarks/gpu_suite.sh runs the plain arms with --train-order shuffled (not the -shuffled arms): random
    entries then search and choose on the grid their shuffled-order runs moved to, and Trainer's order keeps the
    family grid. FISH as shipped has no moved grid in either order."""
    llm_quality = _load("llm_quality")
    suite, arm = llm_quality.COMMONSENSE_SUITE, "random-linear-lora8"
    moved = llm_quality.grid_of(f"{arm}-shuffled", suite)
    assert llm_quality.grid_of(arm, suite, "shuffled") == moved == (3e-3, 1e-2, 3e-2)
    assert llm_quality.off_grid_of(arm, suite, "shuffled") == llm_quality.off_grid_of(f"{arm}-shuffled", suite)
    assert llm_quality.grid_of(arm, suite, "trainer") == llm_quality.GRIDS["mask"]
    assert llm_quality.grid_of("fish-lora8", suite, "shuffled") == llm_quality.GRIDS["mask"]
    args = argparse.Namespace(phase="grid", lrs="", out=str(tmp_path), task=suite, train_order="shuffled")
    assert [lr for _, lr, _ in llm_quality.grid_plan(args, [arm])] == [3e-3, 1e-2, 3e-2]
    _write_seed0_runs(llm_quality, tmp_path, arm, {1e-3: 0.56, 3e-3: 0.5230, 1e-2: 0.5487})
    assert llm_quality.chosen_lr(args, arm) == 1e-2
    markdown, _ = llm_quality.grid_table(args, [arm])
    assert "mask family, grid moved up, seed 0 | lr 0.003 | lr 0.01 | lr 0.03 | chosen" in markdown


def test_the_suite_batches_by_length_and_one_task_does_not():
    llm_quality = _load("llm_quality")
    args = argparse.Namespace(model="m", task="social_iqa,winowhy", data_dir="d", max_seq_length=256, batch_size=16,
                              steps=2, warmup_steps=0, fisher_samples=8, smoke=False)
    suite = llm_quality.command(args, "lora", 1e-3, 0, Path("out"))
    assert suite[suite.index("--train_sampling_strategy") + 1] == "group_by_length"
    assert "--shuffle-length-groups" not in suite  # Trainer's order unless an arm asks for another
    shuffled = llm_quality.command(args, "fish-lora8-shuffled", 1e-3, 0, Path("out"))
    assert "--shuffle-length-groups" in shuffled  # the same run as fish-lora8 otherwise
    assert [f for f in shuffled if f != "--shuffle-length-groups"] == llm_quality.command(args, "fish-lora8", 1e-3, 0,
                                                                                        Path("out"))
    args.train_order = "shuffled"  # --train-order shuffled: every arm's batches shuffled, the flag given once
    assert llm_quality.command(args, "lora", 1e-3, 0, Path("out")).count("--shuffle-length-groups") == 1
    assert llm_quality.command(args, "fish-lora8-shuffled", 1e-3, 0, Path("out")).count("--shuffle-length-groups") == 1
    args.task = "social_iqa"
    assert "--train_sampling_strategy" not in llm_quality.command(args, "lora", 1e-3, 0, Path("out"))


def test_an_arms_runs_in_one_folder_share_one_training_order(tmp_path):
    llm_quality = _load("llm_quality")
    args = argparse.Namespace(task="social_iqa,winowhy", out=str(tmp_path), train_order="trainer")
    (tmp_path / "lora_lr0.003_seed0.json").write_text("{}")  # written before train_order was recorded: Trainer's
    llm_quality.check_one_order(args, "lora", llm_quality.expected_order(args, "lora"))
    args.train_order = "shuffled"
    assert llm_quality.expected_order(args, "lora") == "group_by_length, shuffled batches"
    with pytest.raises(SystemExit, match="use another --out for the other order"):
        llm_quality.check_one_order(args, "lora", llm_quality.expected_order(args, "lora"))
    (tmp_path / "lora_lr0.003_seed1.json").write_text('{"train_order": "group_by_length, shuffled batches"}')
    with pytest.raises(SystemExit, match="mixes runs trained in orders"):  # the summary refuses the folder
        llm_quality.check_one_order(args, "lora")
    # an arm that always shuffles is its own arm: Trainer-order runs of its twin beside it are fine
    (tmp_path / "fish-lora8_lr0.001_seed0.json").write_text("{}")
    (tmp_path / "fish-lora8-shuffled_lr0.001_seed0.json").write_text('{"train_order": "group_by_length, shuffled batches"}')
    args.train_order = "trainer"
    for arm in ("fish-lora8", "fish-lora8-shuffled"):
        llm_quality.check_one_order(args, arm, llm_quality.expected_order(args, arm))
    # one task: no length grouping, so no order to keep apart (older files say nothing, newer ones "random")
    single = argparse.Namespace(task="social_iqa", out=str(tmp_path / "one"), train_order="trainer")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "lora_lr0.003_seed0.json").write_text("{}")
    (tmp_path / "one" / "lora_lr0.003_seed1.json").write_text('{"train_order": "random"}')
    llm_quality.check_one_order(single, "lora", llm_quality.expected_order(single, "lora"))


def test_the_order_report_counts_what_each_step_trains():
    """llm_quality --order-report's statistics on an order built by hand: 2 questions a step, mega-batches of 2 steps."""
    llm_quality = _load("llm_quality")
    kinds = ["a", "a", "b: yes", "b: no", "a", "b: yes", "b: no", "b: no"]
    order = [0, 1, 2, 3, 4, 5, 6, 7]  # steps: [a a] [b b] | [a b] [b b]
    stats = llm_quality._order_statistics(order, kinds, batch=2, steps=4, mega=2)
    assert stats["steps_of_one_task"] == 0.75
    assert stats["task_share_last_10_steps"] == {"a": 0.375, "b": 0.625}
    tenths = stats["task_share_by_tenth_of_mega_batch"]
    assert tenths[0] == {"a": 0.75, "b": 0.25} and tenths[5] == {"a": 0.0, "b": 1.0}  # first steps, then second
    assert tenths[1] is None  # a mega-batch of 2 steps has no step in its second tenth
    # b's questions per mega-batch: (2, 3) then (5, 6, 7): first halves 2 | 5, second halves 3 | 6, 7
    halves = stats["answer_share_by_half_within_mega_batch"]["b"]
    assert halves["first half"] == {"no": 0.0, "yes": 1.0} and halves["second half"] == {"no": 1.0, "yes": 0.0}


def test_a_sweep_creates_its_scratch_folder(tmp_path, monkeypatch):
    """The first suite launch failed in tempfile.mkdtemp: --scratch named a folder that did not exist yet."""
    llm_quality = _load("llm_quality")

    class Reached(Exception):
        pass

    def stop(line):
        raise Reached

    monkeypatch.setattr(llm_quality, "provenance", stop)  # the step after the run folder is made: train nothing
    scratch = tmp_path / "not" / "there"
    args = argparse.Namespace(model="m", task="social_iqa", data_dir="d", max_seq_length=256, batch_size=16,
                              steps=2, warmup_steps=0, fisher_samples=8, smoke=False, out=str(tmp_path / "out"),
                              summary_only=False, scratch=str(scratch))
    with pytest.raises(Reached):
        llm_quality.run_one(args, "lora", 1e-3, 0)
    assert len(list(scratch.iterdir())) == 1  # the run's folder, inside the scratch folder it created


def test_seeds_are_averaged_before_the_choice(lr_defaults, tmp_path, monkeypatch):
    """--seeds: each cell is the mean over the seeds (their spread kept), and the default is chosen on the means.
    Seed 0 alone would choose 3e-4 on 'stsb'; seeds 1 and 2 put 1e-3 ahead on the mean."""
    import json

    scores = {0: {3e-4: 0.80, 1e-3: 0.70, 3e-3: 0.01, 1e-2: 0.02},
              1: {3e-4: 0.60, 1e-3: 0.81, 3e-3: 0.60, 1e-2: 0.03},
              2: {3e-4: 0.62, 1e-3: 0.80, 3e-3: 0.02, 1e-2: 0.01}}

    def fake_point(args, arm, lr, points):
        points[lr] = {"train_steps": 540, "metrics": {"validation": {"pearson": scores[args.seed][lr]}},
                      "validation_log": [{"pearson": scores[args.seed][lr] - 0.1}, {"pearson": scores[args.seed][lr]}]}

    monkeypatch.setattr(lr_defaults, "_run_point", fake_point)
    monkeypatch.setattr(lr_defaults, "chance_bar", lambda task, glue_dir: 0.05)
    monkeypatch.setattr(lr_defaults, "GRIDS", {"lora": (3e-4, 1e-3, 3e-3, 1e-2)})
    out = tmp_path / "table.json"
    for seeds, expected in (("0", 3e-4), ("0,1,2", 1e-3)):
        monkeypatch.setattr(sys, "argv", ["lr_defaults.py", "--families", "lora", "--tasks", "stsb", "--seeds", seeds,
                                          "--llm", str(tmp_path / "none"), "--summary-only", "--write", str(out)])
        lr_defaults.main()
        family = json.loads(out.read_text())["families"]["lora"]
        assert family["chosen"] == expected
    label = "minilm/stsb (540 steps, 3 seeds)"
    assert family["by_task"][label]["0.001"] == pytest.approx((0.70 + 0.81 + 0.80) / 3)
    assert family["by_task_seeds"][label]["0.003"] == [0.01, 0.60, 0.02]
    assert family["validation_curves"][label]["0.001"] == pytest.approx([(0.70 + 0.81 + 0.80) / 3 - 0.1,
                                                                         (0.70 + 0.81 + 0.80) / 3])
    assert "0.770 ± 0.061 (1.00)" in json.loads(out.read_text())["markdown"]


def test_the_screens_convergence_check_reruns_each_arm_at_its_chosen_rate_only(tmp_path, monkeypatch):
    """selection_screen.py --rates-from: one run per arm, at the rate the earlier screen chose; an arm the file does
    not have stops the check before any training."""
    screen = _load("selection_screen")
    earlier = tmp_path / "screen.json"
    earlier.write_text('{"table": {"lora-r8": {"best_lr": 0.003}, "fish": {"best_lr": 0.002}}}')
    assert screen.chosen_rates(str(earlier), ["fish", "lora-r8"]) == {"fish": 0.002, "lora-r8": 0.003}
    with pytest.raises(SystemExit, match="random-linear"):
        screen.chosen_rates(str(earlier), ["fish", "random-linear"])
    later = tmp_path / "later.json"  # a later screen of new arms, read beside the first
    later.write_text('{"table": {"random-linear": {"best_lr": 0.01}}}')
    assert screen.chosen_rates(f"{earlier},{later}", ["fish", "random-linear"]) == {"fish": 0.002,
                                                                                    "random-linear": 0.01}
    ran = []
    monkeypatch.setattr(screen, "_run_point", lambda args, arm, lr, points: ran.append((arm, lr)))
    monkeypatch.setattr(screen, "summarise", lambda results: ("", {}))
    monkeypatch.setattr(screen, "paired_tests", lambda args, table: ("", {}))
    monkeypatch.setattr(sys, "argv", ["selection_screen.py", "--arms", "lora-r8,fish", "--rates-from", str(earlier),
                                      "--out", str(tmp_path / "runs")])
    screen.main()
    assert ran == [("lora-r8", 0.003), ("fish", 0.002)]


def test_the_screens_table_shows_the_validation_curve():
    screen = _load("selection_screen")
    run = {"metrics": {"validation": {"accuracy": 0.8}}, "trainable_params": 10, "train_seconds": 1.0,
           "validation_log": [{"step": 125, "loss": 0.4, "accuracy": 0.75}, {"step": 250, "accuracy": 0.8}]}
    markdown, table = screen.summarise({"lora-r8": {0.003: run}})
    assert table["lora-r8"]["validation_curve"] == [75.0, 80.0]
    assert "75.00 · 80.00" in markdown


def _seed_file(seed, lora_acc, fish_acc, counts, lr=0.002, epochs=4.0):
    args = {"seed": seed, "glue_dir": "g", "max_train_samples": 4000, "max_seq_length": 64, "epochs": epochs,
            "batch_size": 32, "warmup_steps": 10, "num_samples": 256}
    table = {"lora-r8": {"best_lr": 0.003, "accuracy": lora_acc, "validation_curve": [lora_acc - 2, lora_acc]},
             "fish": {"best_lr": lr, "accuracy": fish_acc, "validation_curve": [fish_acc - 1, fish_acc]}}
    ours, theirs = counts
    paired = {"fish_vs_lora-r8": {"diff": fish_acc - lora_acc, "only_arm_right": ours, "only_reference_right": theirs,
                                  "p": 0.5}}
    return {"args": args, "grids": {}, "table": table, "paired": paired}


def test_the_screens_seeds_pool_into_mean_std_and_a_mcnemar_test_over_the_summed_disagreements():
    from scipy.stats import binomtest, ttest_rel

    screen = _load("selection_screen")
    files = [_seed_file(0, 84.0, 80.0, (10, 30)), _seed_file(1, 83.0, 82.0, (20, 25))]
    markdown, table, paired = screen.combine_seeds(files)
    assert table["lora-r8"]["mean"] == pytest.approx(83.5)
    assert table["lora-r8"]["std"] == pytest.approx(0.7071, abs=1e-4)
    assert table["fish"]["mean_validation_curve"] == pytest.approx([80.0, 81.0])
    pooled = paired["fish_vs_lora-r8"]
    assert (pooled["only_arm_right"], pooled["only_reference_right"]) == (30, 55)
    assert pooled["pooled_p"] == pytest.approx(binomtest(30, 85, 0.5).pvalue)
    assert pooled["diff_mean"] == pytest.approx(-2.5)
    # over the training seeds: the accuracy differences -4 and -1, a paired t-test
    assert pooled["seeds_t"] == pytest.approx(-2.5 / (2.1213 / 2 ** 0.5), abs=1e-3)
    assert pooled["seeds_p"] == pytest.approx(ttest_rel([80.0, 82.0], [84.0, 83.0]).pvalue)
    assert "30 / 55" in markdown


@pytest.mark.parametrize("second, message", [
    (_seed_file(0, 83.0, 82.0, (1, 1)), "repeat a seed"),
    (_seed_file(1, 83.0, 82.0, (1, 1), lr=0.005), "fish ran at lr 0.005"),
    (_seed_file(1, 83.0, 82.0, (1, 1), epochs=2.0), "epochs=2.0"),
    ({"table": {}, "paired": {}, "seed_files": []}, "not one seed's --write file"),  # an already pooled file
])
def test_seed_files_of_different_protocols_or_rates_are_refused(tmp_path, second, message):
    import json

    screen = _load("selection_screen")
    paths = []
    for i, data in enumerate([_seed_file(0, 84.0, 80.0, (1, 1)), second]):
        paths.append(str(tmp_path / f"s{i}.json"))
        Path(paths[-1]).write_text(json.dumps(data))
    with pytest.raises(SystemExit, match=message):
        screen.load_seed_files(paths)
