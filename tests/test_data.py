import numpy as np
import pytest

from sparsepeft.data import DataError, GLUE_TASKS, compute_metrics, load_files, load_glue
from sparsepeft.experiments.pipeline import load_task_data

SHARED_TASKS = {"cola": (8551, 1043, 2), "sst2": (67349, 872, 2), "rte": (2490, 277, 2), "stsb": (5749, 1500, 1),
                "wnli": (635, 71, 2)}


@pytest.mark.parametrize("task", sorted(SHARED_TASKS))
def test_glue_loaders_read_the_shared_files(glue_dir, task):
    data = load_glue(task, glue_dir)
    n_train, n_dev, n_labels = SHARED_TASKS[task]
    assert len(data.train) == n_train and len(data.evaluation["validation"]) == n_dev
    assert data.num_labels == n_labels
    assert all(isinstance(t, str) and t for row in data.train.texts[:50] for t in row)
    if n_labels > 1:
        assert set(data.train.labels) == {0, 1}
    else:
        assert 0.0 <= min(data.train.labels) and max(data.train.labels) <= 5.0


def test_task_folder_may_be_given_directly_and_labels_follow_hub_order(glue_dir):
    data = load_glue("RTE", glue_dir / "RTE")
    assert data.label_names == ("entailment", "not_entailment")
    assert data.train.labels[0] == 1  # first RTE train row is not_entailment


def test_every_glue_task_has_its_official_metric():
    assert GLUE_TASKS["cola"].metrics == ("matthews_correlation",)
    assert GLUE_TASKS["mrpc"].metrics == GLUE_TASKS["qqp"].metrics == ("accuracy", "f1")
    assert GLUE_TASKS["stsb"].metrics == ("pearson", "spearmanr")
    assert set(GLUE_TASKS["mnli"].eval_files) == {"validation_matched", "validation_mismatched"}
    for name in ("sst2", "rte", "wnli", "qnli", "mnli"):
        assert GLUE_TASKS[name].metrics == ("accuracy",)


def test_malformed_and_missing_files_name_the_file_and_line(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly two\n")
    (tmp_path / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(DataError, match=r"train.tsv, line 3"):
        load_glue("rte", tmp_path)
    (tmp_path / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(DataError, match=r"dev.tsv, line 2, column 'label': label 'maybe'"):
        load_glue("rte", tmp_path)
    (tmp_path / "RTE" / "dev.tsv").unlink()
    with pytest.raises(DataError, match="Missing GLUE file .*dev.tsv"):
        load_glue("rte", tmp_path)
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("text\tlabel\nfine\t1\n")
    with pytest.raises(DataError, match=r"no column \['sentence'\]"):
        load_glue("sst2", tmp_path)


def test_hub_failure_says_how_to_use_a_local_folder(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="--data-dir"):
        load_glue("rte")


def test_user_files_csv_jsonl_and_regression(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"q": "a", "s": 0.5}\n{"q": "b", "s": 2.25}\n')
    data = load_files(tmp_path / "t.jsonl", tmp_path / "t.jsonl", ["q"], "s")
    assert data.is_regression and data.train.labels == [0.5, 2.25]
    (tmp_path / "c.csv").write_text("x,y,lab\nhi,there,b\nyo,man,a\n")
    data = load_files(tmp_path / "c.csv", tmp_path / "c.csv", ["x", "y"], "lab")
    assert data.label_names == ("a", "b") and data.train.labels == [1, 0] and data.train.texts[0] == ("hi", "there")
    with pytest.raises(DataError, match="no column"):
        load_files(tmp_path / "c.csv", tmp_path / "c.csv", ["text"], "lab")


def test_demo_data_ships_with_the_package():
    data = load_task_data("demo")
    assert len(data.train) == 1000 and len(data.evaluation["validation"]) == 400
    assert data.label_names == ("0", "1")


def test_metrics_match_their_definitions():
    labels = np.array([0, 1, 1, 0, 1])
    logits = np.array([[2, 0], [0, 1], [3, 1], [0, 2], [0, 5]], dtype=float)  # predicts 0 1 0 1 1
    m = compute_metrics(("accuracy", "f1"), logits, labels)
    assert m["accuracy"] == pytest.approx(0.6) and m["f1"] == pytest.approx(2 / 3)
    assert m["combined_score"] == pytest.approx((0.6 + 2 / 3) / 2)
    mcc = compute_metrics(("matthews_correlation",), logits, labels)["matthews_correlation"]
    assert mcc == pytest.approx((1 * 2 - 1 * 1) / np.sqrt(3 * 2 * 2 * 3))
    r = compute_metrics(("pearson", "spearmanr"), np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 2.0, 4.0]))
    assert r["spearmanr"] == pytest.approx(1.0) and 0.95 < r["pearson"] < 1.0


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl"])
def test_files_with_a_utf8_byte_order_mark_are_read(tmp_path, suffix):
    """Excel and other Windows tools write a BOM; the first column must not become '\\ufeffQuality'."""
    import json

    rows = [{"Quality": "1", "sentence": "good"}, {"Quality": "0", "sentence": "bad"}]
    if suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        text = "\n".join([sep.join(rows[0])] + [sep.join(r.values()) for r in rows]) + "\n"
    elif suffix == ".json":
        text = json.dumps(rows)
    else:
        text = "\n".join(json.dumps(r) for r in rows) + "\n"
    for name in ("train", "dev"):
        (tmp_path / f"{name}{suffix}").write_text("\ufeff" + text, encoding="utf-8")
    data = load_files(tmp_path / f"train{suffix}", tmp_path / f"dev{suffix}", ["sentence"], "Quality")
    assert data.train.texts == [("good",), ("bad",)] and data.label_names == ("0", "1")


def test_a_glue_file_with_a_byte_order_mark_is_read(tmp_path):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text("\ufeffsentence\tlabel\na fine film\t1\na dull one\t0\n", encoding="utf-8")
    data = load_glue("sst2", tmp_path)
    assert data.train.labels == [1, 0] and data.train.texts[0] == ("a fine film",)


@pytest.mark.parametrize("content, message", [
    ("sentence,label\na good film,pos\na bad film,neg\ncut off here\n", r"line 4: no value for \['label'\]"),
    ("sentence,label\na good film,pos\na bad film,\n", r"line 3: the label column 'label' is empty"),
    ("sentence,label\na good film,pos\na bad film,neg,extra\n", r"line 3: 3 fields, the header has 2"),
])
def test_malformed_csv_rows_are_named_instead_of_becoming_classes(tmp_path, content, message):
    from sparsepeft.data import DataError, load_files

    (tmp_path / "train.csv").write_text(content)
    (tmp_path / "dev.csv").write_text("sentence,label\nfine,pos\n")
    with pytest.raises(DataError, match=message):
        load_files(tmp_path / "train.csv", tmp_path / "dev.csv", ["sentence"])


def test_labels_come_from_the_training_file_and_an_unknown_validation_label_is_named(tmp_path):
    from sparsepeft.data import DataError, load_files

    (tmp_path / "train.csv").write_text("sentence,label\ngood,pos\nbad,neg\n")
    (tmp_path / "dev.csv").write_text("sentence,label\nfine,pos\nmeh,neutral\n")
    with pytest.raises(DataError, match=r"dev.csv, line 3: label 'neutral' does not occur in the training file"):
        load_files(tmp_path / "train.csv", tmp_path / "dev.csv", ["sentence"])


def test_a_jsonl_row_without_the_label_and_a_non_utf8_file_name_the_file_and_row(tmp_path):
    from sparsepeft.data import DataError, load_files

    (tmp_path / "train.jsonl").write_text('{"sentence": "good", "label": "pos"}\n{"sentence": "bad"}\n')
    (tmp_path / "dev.jsonl").write_text('{"sentence": "fine", "label": "pos"}\n')
    with pytest.raises(DataError, match=r"train.jsonl, line 2: no value for \['label'\]"):
        load_files(tmp_path / "train.jsonl", tmp_path / "dev.jsonl", ["sentence"])
    (tmp_path / "latin.csv").write_bytes("sentence,label\ncaf\xe9,pos\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv is not UTF-8 text \(byte 0xe9 .*iconv"):
        load_files(tmp_path / "latin.csv", tmp_path / "dev.jsonl", ["sentence"])
