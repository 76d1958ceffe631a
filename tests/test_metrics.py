from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score, confusion_matrix, f1_score

from canal import metrics
from canal.metrics import UNASSIGNED

# 3-class hand example.
#   a: tp=2 fp=0 fn=1 -> P=1,   R=2/3, F1=0.8
#   b: tp=2 fp=1 fn=0 -> P=2/3, R=1,   F1=0.8
#   c: tp=1 fp=0 fn=0 -> F1=1
#   macro F1 = 2.6 / 3
Y_TRUE = ["a", "a", "a", "b", "b", "c"]
Y_PRED = ["a", "a", "b", "b", "b", "c"]


def test_accuracy_and_macro_f1_hand_example():
    assert metrics.accuracy(Y_TRUE, Y_PRED) == pytest.approx(5 / 6)
    assert metrics.macro_f1(Y_TRUE, Y_PRED) == pytest.approx(2.6 / 3)
    assert metrics.macro_f1(Y_TRUE, Y_PRED) == pytest.approx(
        f1_score(Y_TRUE, Y_PRED, average="macro"))


def test_inputs_accept_pandas_and_numpy():
    t = pd.Series(pd.Categorical(Y_TRUE))
    p = np.array(Y_PRED)
    assert metrics.accuracy(t, p) == pytest.approx(5 / 6)
    assert metrics.macro_f1(pd.Categorical(Y_TRUE), list(Y_PRED)) == pytest.approx(2.6 / 3)
    # non-string labels are compared as strings
    assert metrics.accuracy([1, 2, 3], ["1", "2", "4"]) == pytest.approx(2 / 3)


def test_macro_f1_unassigned_is_a_miss_but_not_a_class():
    y_true = ["a", "a", "b", "b"]
    y_pred = ["a", UNASSIGNED, "b", "b"]
    # a: P=1, R=1/2 -> F1=2/3; b: F1=1 -> mean over {a, b} = 5/6
    assert metrics.macro_f1(y_true, y_pred) == pytest.approx(5 / 6)
    # sklearn's default would average Unassigned in as a 0 -> 5/9
    assert f1_score(y_true, y_pred, average="macro") == pytest.approx(5 / 9)
    assert metrics.macro_f1(y_true, y_pred, labels=["a"]) == pytest.approx(2 / 3)


def test_ari_matches_sklearn():
    assert metrics.ari(["x", "x", "y", "y"], ["1", "1", "0", "0"]) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    t = rng.choice(list("abc"), size=40)
    p = rng.choice(list("abcd"), size=40)
    assert metrics.ari(t, p) == pytest.approx(adjusted_rand_score(t, p))


def test_length_mismatch_and_empty_raise():
    with pytest.raises(ValueError, match="same length"):
        metrics.accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        metrics.accuracy([], [])
    with pytest.raises(TypeError, match="single string"):
        metrics.accuracy("ab", "ab")


def test_confusion_counts_and_normalisation():
    y_true = ["a", "a", "a", "b", "b"]
    y_pred = ["a", "b", UNASSIGNED, "b", "c"]
    cm = metrics.confusion(y_true, y_pred)
    assert list(cm.index) == ["a", "b"]
    assert list(cm.columns) == ["a", "b", "c", UNASSIGNED]
    assert cm.index.name == "true" and cm.columns.name == "pred"
    expected = np.array([[1, 1, 0, 1], [0, 1, 1, 0]])
    np.testing.assert_array_equal(cm.to_numpy(), expected)
    labels = ["a", "b", "c", UNASSIGNED]
    np.testing.assert_array_equal(
        cm.to_numpy(), confusion_matrix(y_true, y_pred, labels=labels)[:2])

    rows = metrics.confusion(y_true, y_pred, normalize="true")
    np.testing.assert_allclose(rows.to_numpy().sum(axis=1), [1.0, 1.0])
    assert rows.loc["a", UNASSIGNED] == pytest.approx(1 / 3)
    cols = metrics.confusion(y_true, y_pred, normalize="pred")
    assert cols.loc["b", "b"] == pytest.approx(0.5)
    assert metrics.confusion(y_true, y_pred, normalize="all").to_numpy().sum() == pytest.approx(1)

    only_a = metrics.confusion(y_true, y_pred, labels=["a"])
    assert list(only_a.index) == ["a"]
    assert only_a.to_numpy().sum() == 3
    with pytest.raises(ValueError, match="normalize"):
        metrics.confusion(y_true, y_pred, normalize="rows")  # type: ignore[arg-type]


def test_novel_scores_hand_example():
    # 4 known cells, 3 correct; 2 novel cells, 1 Unassigned
    y_true = ["a", "a", "b", "b", "X", "X"]
    y_pred = ["a", "a", "b", "a", UNASSIGNED, "b"]
    s = metrics.novel_scores(y_true, y_pred, novel_types=["X"])
    assert s["known_accuracy"] == pytest.approx(0.75)
    assert s["unknown_accuracy"] == pytest.approx(0.5)
    assert s["h_score"] == pytest.approx(0.6)
    assert (s["n_known"], s["n_novel"]) == (4, 2)
    # a single string is one novel type
    assert metrics.novel_scores(y_true, y_pred, novel_types="X")["h_score"] == pytest.approx(0.6)


def test_novel_scores_h_zero_and_errors():
    s = metrics.novel_scores(["a", "X"], ["a", "a"], novel_types=["X"])
    assert s["known_accuracy"] == 1.0 and s["unknown_accuracy"] == 0.0
    assert s["h_score"] == 0.0
    with pytest.raises(ValueError, match="novel_types is empty"):
        metrics.novel_scores(["a"], ["a"], novel_types=[])
    with pytest.raises(ValueError, match="none of novel_types"):
        metrics.novel_scores(["a", "b"], ["a", "b"], novel_types=["X"])


def test_summarize_maps_novel_types_to_unassigned():
    y_true = ["a", "a", "b", "b", "X", "X"]
    y_pred = ["a", "a", "b", "a", UNASSIGNED, "b"]
    plain = metrics.summarize(y_true, y_pred)
    assert set(plain) == {"accuracy", "macro_f1", "ari", "n_cells"}
    assert plain["accuracy"] == pytest.approx(3 / 6)
    assert plain["n_cells"] == 6

    s = metrics.summarize(y_true, y_pred, novel_types=["X"])
    # mapped truth: a a b b U U -> 4 of 6 correct
    assert s["accuracy"] == pytest.approx(4 / 6)
    # a: F1=0.8; b: P=1/2 R=1/2 F1=0.5; Unassigned: P=1 R=1/2 F1=2/3
    assert s["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    mapped = ["a", "a", "b", "b", UNASSIGNED, UNASSIGNED]
    assert s["ari"] == pytest.approx(adjusted_rand_score(mapped, y_pred))
    assert s["h_score"] == pytest.approx(0.6)
    assert (s["n_known"], s["n_novel"]) == (4, 2)


# Hand matrix: rows = after stage t, columns = test set j
R = np.array([
    [0.9, np.nan, np.nan],
    [0.7, 0.8, np.nan],
    [0.6, 0.7, 0.95],
])


def test_stream_metrics_hand_matrix():
    assert metrics.average_accuracy(R) == pytest.approx((0.6 + 0.7 + 0.95) / 3)
    # ((0.6 - 0.9) + (0.7 - 0.8)) / 2
    assert metrics.backward_transfer(R) == pytest.approx(-0.2)
    # j=0: max(0.9, 0.7) - 0.6 = 0.3; j=1: 0.8 - 0.7 = 0.1
    assert metrics.forgetting(R) == pytest.approx(0.2)


def test_stream_metrics_edge_cases():
    single = np.array([[0.8]])
    assert metrics.average_accuracy(single) == pytest.approx(0.8)
    assert math.isnan(metrics.backward_transfer(single))
    assert math.isnan(metrics.forgetting(single))
    with pytest.raises(ValueError, match="square"):
        metrics.backward_transfer(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="2-D"):
        metrics.forgetting(np.zeros(3))
    # improvement on an old task gives positive BWT and negative forgetting
    better = np.array([[0.5, np.nan], [0.7, 0.9]])
    assert metrics.backward_transfer(better) == pytest.approx(0.2)
    assert metrics.forgetting(better) == pytest.approx(-0.2)


def test_accuracy_matrix_from_records():
    records = [
        {"stage": 0, "test": "pancreas", "accuracy": 0.9},
        {"stage": 1, "test": "pancreas", "accuracy": 0.7},
        {"stage": 1, "test": "lung", "accuracy": 0.8},
        {"stage": 2, "test": "pancreas", "accuracy": 0.6},
        {"stage": 2, "test": "lung", "accuracy": 0.7},
        {"stage": 2, "test": "blood", "accuracy": 0.95},
    ]
    df = metrics.accuracy_matrix(records)
    assert list(df.index) == [0, 1, 2]
    assert list(df.columns) == ["pancreas", "lung", "blood"]
    np.testing.assert_allclose(df.to_numpy(), R, equal_nan=True)
    assert metrics.backward_transfer(df) == pytest.approx(-0.2)

    with pytest.raises(ValueError, match="twice"):
        metrics.accuracy_matrix(records + [records[0]])
    with pytest.raises(ValueError, match="lacks key"):
        metrics.accuracy_matrix([{"stage": 0, "test": "x"}])
