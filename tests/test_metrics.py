"""common.metrics equals scikit-learn on fixed predictions over real MedMNIST / Kermany labels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from common import metrics as M

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _breast_test_labels() -> np.ndarray:
    with np.load(SHARED / "medmnist" / "breastmnist.npz") as z:
        return z["test_labels"].reshape(-1).astype(np.int64)


def _kermany_three_class() -> np.ndarray:
    """normal / bacterial / viral from the Kermany labels.csv (real labels, 3 classes)."""
    codes = {"": 0, "bacteria": 1, "virus": 2}
    with open(SHARED / "xray" / "kermany_cxr_224" / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    return np.array([codes[r["pneumonia_subtype"]] for r in rows if r["split"] == "test"], dtype=np.int64)


def _scores(n: int, k: int, seed: int, y: np.ndarray, decimals: int) -> np.ndarray:
    """Softmax scores loosely correlated with y, rounded so that ties occur."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.0
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    return np.round(p, decimals)


@pytest.mark.parametrize("decimals", [1, 6])
def test_binary_metrics_equal_sklearn(decimals: int) -> None:
    y = _breast_test_labels()
    p = _scores(len(y), 2, 0, y, decimals)
    pred = p.argmax(1)
    out = M.classification_metrics(y, p, ["malignant", "benign"])
    assert out["acc"] == pytest.approx(skm.accuracy_score(y, pred))
    assert out["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert out["auc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]))
    assert out["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert out["confusion_matrix"]["matrix"] == skm.confusion_matrix(y, pred).tolist()
    prec = skm.precision_score(y, pred, average=None)
    rec = skm.recall_score(y, pred, average=None)
    for i, name in enumerate(["malignant", "benign"]):
        assert out["per_class"][name]["precision"] == pytest.approx(prec[i])
        assert out["per_class"][name]["recall"] == pytest.approx(rec[i])


def test_multiclass_metrics_equal_sklearn() -> None:
    y = _kermany_three_class()
    assert set(np.unique(y)) == {0, 1, 2}
    p = _scores(len(y), 3, 1, y, 2)
    p = p / p.sum(1, keepdims=True)  # sklearn's OvR AUC insists on rows summing to 1
    pred = p.argmax(1)
    out = M.classification_metrics(y, p)
    assert out["acc"] == pytest.approx(skm.accuracy_score(y, pred))
    assert out["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert out["auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert out["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    cm = M.confusion_matrix(y, pred, 3)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y, pred, labels=[0, 1, 2]))
    per_class_auc = M.per_class_auc(y, p)
    for k in range(3):
        assert per_class_auc[k] == pytest.approx(skm.roc_auc_score(y == k, p[:, k]))


def test_macro_f1_counts_a_never_predicted_class_as_zero() -> None:
    y = _kermany_three_class()
    pred = np.where(y == 2, 1, y)  # class 2 never predicted
    assert M.macro_f1(y, pred, 3) == pytest.approx(skm.f1_score(y, pred, average="macro", labels=[0, 1, 2],
                                                               zero_division=0))


def test_multilabel_auc_equals_sklearn() -> None:
    codes = {"": 0, "bacteria": 1, "virus": 2}
    with open(SHARED / "xray" / "kermany_cxr_224" / "labels.csv") as fh:
        sub = np.array([codes[r["pneumonia_subtype"]] for r in csv.DictReader(fh)])
    y = np.stack([sub > 0, sub == 1, sub == 2], axis=1).astype(np.int64)  # pneumonia, bacterial, viral
    rng = np.random.default_rng(2)
    s = np.round(np.clip(y * 0.3 + rng.uniform(size=y.shape), 0, 1), 2)
    mean, per_label = M.multilabel_auc(y, s)
    np.testing.assert_allclose(per_label, skm.roc_auc_score(y, s, average=None))
    assert mean == pytest.approx(skm.roc_auc_score(y, s, average="macro"))
    out = M.multilabel_metrics(y, s, ["pneumonia", "bacterial", "viral"], n_bootstrap=50)
    assert out["auc"] == pytest.approx(mean)
    pred = (s >= 0.5).astype(int)
    assert out["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    lo, hi = out["ci95"]["auc"]
    assert lo <= mean <= hi
    assert set(out["ci95"]) == {"acc", "balanced_acc", "auc", "f1"}
    acc_per_label = [skm.accuracy_score(y[:, j], pred[:, j]) for j in range(3)]
    assert out["acc"] == pytest.approx(np.mean(acc_per_label))
    bacc_per_label = [skm.balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(3)]
    assert out["balanced_acc"] == pytest.approx(np.mean(bacc_per_label))


def test_undefined_auc_is_nan_not_an_error() -> None:
    y = np.zeros(10, dtype=int)
    p = np.full((10, 2), 0.5)
    assert np.isnan(M.macro_auc(y, p))
    out = M.classification_metrics(y, p, n_bootstrap=20)
    assert out["auc"] is None
    json.dumps(out)  # JSON-ready: no NaN


def test_bootstrap_ci_brackets_the_point_estimate_and_is_reproducible() -> None:
    y = _breast_test_labels()
    p = _scores(len(y), 2, 3, y, 6)
    a = M.classification_metrics(y, p, n_bootstrap=200, seed=7)
    b = M.classification_metrics(y, p, n_bootstrap=200, seed=7)
    assert a["ci95"] == b["ci95"]
    for key in ("acc", "balanced_acc", "auc", "f1"):
        lo, hi = a["ci95"][key]
        assert lo < a[key] < hi, key
        assert hi - lo < 0.3


def test_confusion_matrix_json_and_png(tmp_path: Path) -> None:
    y = _kermany_three_class()
    pred = np.roll(y, 1)
    cm = M.confusion_matrix(y, pred, 3)
    j, png = M.save_confusion_matrix(cm, ["normal", "bacterial", "viral"], tmp_path / "cm_test")
    data = json.loads(j.read_text())
    assert data["matrix"] == cm.tolist() and data["labels"] == ["normal", "bacterial", "viral"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_label_out_of_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="outside"):
        M.confusion_matrix([0, 3], [0, 1], 2)


def test_fitted_threshold_maximises_balanced_accuracy_and_sits_between_scores() -> None:
    """A head that ranks perfectly but scores every positive under 0.5: the argmax rule calls all negative
    (balanced accuracy 0.5); the fitted cut lies midway between the classes and separates them."""
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.05, 0.1, 0.2, 0.3])
    cut = M.fit_binary_threshold(y, p1)
    assert cut == pytest.approx(0.15)
    at_cut = M.binary_threshold_metrics(y, p1, cut)
    assert at_cut["balanced_acc"] == 1.0 and at_cut["confusion_matrix"] == [[2, 0], [0, 2]]
    assert M.binary_threshold_metrics(y, p1, 0.5)["balanced_acc"] == 0.5
    # Equally good cuts: the one nearest the argmax rule's 0.5 wins.
    assert M.fit_binary_threshold([0, 1], [0.1, 0.9]) == pytest.approx(0.5)
    assert M.fit_binary_threshold([1, 1, 1], [0.2, 0.4, 0.6]) is None
    assert M.fit_binary_threshold([0, 1], [0.2, float("nan")]) is None


@pytest.mark.parametrize("decimals", [2, 6])
def test_fitted_threshold_equals_brute_force_on_real_labels(decimals: int) -> None:
    """On BreastMNIST's real test labels with tied scores: no cut through the scores does better, and the metrics
    at the cut equal scikit-learn's on the same calls (with bootstrap intervals around them)."""
    y = _breast_test_labels()
    p1 = _scores(len(y), 2, seed=3, y=y, decimals=decimals)[:, 1]
    cut = M.fit_binary_threshold(y, p1)
    best = max(skm.balanced_accuracy_score(y, (p1 >= c).astype(int)) for c in np.unique(p1))
    pred = (p1 >= cut).astype(int)
    assert skm.balanced_accuracy_score(y, pred) == pytest.approx(best)
    m = M.binary_threshold_metrics(y, p1, cut, n_bootstrap=200, seed=1)
    assert m["acc"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    lo, hi = m["ci95"]["balanced_acc"]
    assert lo <= m["balanced_acc"] <= hi
