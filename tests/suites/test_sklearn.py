"""Heads as scikit-learn estimators: check_estimator, classes_, numpy/torch I/O, clone, Pipeline, GridSearchCV.

scikit-learn is optional (the ``[all]`` extra): the tests that need it skip without it.
"""
from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

from lt_rebalance.heads import CRT, KNN, LWS, NCM, CRTGrid, JointHead, LinearProbe, TauNorm
from lt_rebalance.heads.base import NotFittedError
from lt_rebalance.heads.labels import encode_labels, index_labels
from lt_rebalance.posthoc import LogitAdjustment, TemperatureScaled

try:
    import sklearn  # noqa: F401
    from sklearn.utils.estimator_checks import parametrize_with_checks
except ImportError:  # pragma: no cover - the [all] extra is not installed
    parametrize_with_checks = None

needs_sklearn = pytest.mark.skipif(parametrize_with_checks is None, reason="needs scikit-learn (pip install .[all])")
pytestmark = [pytest.mark.usefixtures("torch_one_thread"),
              pytest.mark.filterwarnings("ignore:Estimator .* does not inherit from `sklearn.base.BaseEstimator`")]


# -- independent numpy references ---------------------------------------------------------------
def blobs(n_per_class=(30, 20, 10), dim=4, seed=0, spread=4.0):
    """Gaussian blobs, one per class, centres ``spread`` apart: float64 X (N, D), int y (N,)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(n_per_class), dim)) * spread
    y = np.repeat(np.arange(len(n_per_class)), n_per_class)
    X = centres[y] + rng.normal(size=(len(y), dim))
    order = rng.permutation(len(y))
    return X[order], y[order]


def np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def np_ncm_predict(Xtr, ytr, X, variant):
    """docs/METHODS.md, NCM, for 'cl2n' and 'un': label of the nearest class mean (classes = sorted labels)."""
    classes = np.unique(ytr)
    mu = Xtr.mean(0) if variant == "cl2n" else 0.0

    def t(Z):
        Z = Z - mu
        return Z / np.linalg.norm(Z, axis=1, keepdims=True) if variant == "cl2n" else Z

    cent = np.stack([t(Xtr)[ytr == c].mean(0) for c in classes])
    return classes[((t(X)[:, None, :] - cent[None]) ** 2).sum(-1).argmin(1)]


def np_standardize(Xtr, X):
    return (X - Xtr.mean(0)) / Xtr.std(0)


# -- scikit-learn's own checks --------------------------------------------------------------------
if parametrize_with_checks is not None:
    with warnings.catch_warnings():  # "does not inherit from BaseEstimator": by design, no dependency
        warnings.simplefilter("ignore", UserWarning)
        checks = parametrize_with_checks([NCM(), CRT(), KNN(k=3), LinearProbe(device="cpu")])

    @checks
    def test_check_estimator(estimator, check):
        check(estimator)

else:  # pragma: no cover

    @needs_sklearn
    def test_check_estimator():
        pass


def test_works_without_sklearn(monkeypatch):
    """Every head method with scikit-learn unimportable (as on a plain install)."""
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import sklearn...` now raises ImportError
    X, y = blobs()
    ylab = np.array(["a", "b", "c"])[y]
    for head in (NCM(), CRT(epochs=2, device="cpu")):
        with pytest.raises(NotFittedError, match="not fitted yet"):
            head.predict(X)
        head.fit(X, ylab)
        assert set(head.predict(X)) <= {"a", "b", "c"} and 0 <= head.score(X, ylab) <= 1
        assert head.predict_proba(X).shape == head.decision_function(X).shape == (len(X), 3)
        with pytest.warns(UserWarning, match="column-vector y"):
            head.fit(X, ylab[:, None])
    with pytest.raises(ImportError):
        NCM().__sklearn_tags__()


# -- classes_ and label mapping ---------------------------------------------------------------------
def test_string_and_noncontiguous_labels_round_trip():
    X, y = blobs()
    for labels in (np.array(["cat", "dog", "eel"]), np.array([0, 2, 5]), np.array([-1.0, 1.0, 7.0])):
        ylab = labels[y]
        head = NCM().fit(X, ylab)
        np.testing.assert_array_equal(head.classes_, labels)
        pred = head.predict(X[:20])
        assert isinstance(pred, np.ndarray) and pred.dtype == labels.dtype
        np.testing.assert_array_equal(pred, np_ncm_predict(X, ylab, X[:20], "cl2n"))
        assert head.score(X, ylab) == pytest.approx(np.mean(np_ncm_predict(X, ylab, X, "cl2n") == ylab))
    # torch in -> torch out, with the labels themselves (not column indices)
    head = NCM().fit(torch.from_numpy(X), torch.tensor([0, 2, 5])[torch.from_numpy(y)])
    pred = head.predict(torch.from_numpy(X[:20]).float())
    assert isinstance(pred, torch.Tensor)
    np.testing.assert_array_equal(pred.numpy(), np_ncm_predict(X, np.array([0, 2, 5])[y], X[:20], "cl2n"))
    head = NCM().fit(X, np.array(["cat", "dog", "eel"])[y])
    first = head.predict(X[:1])[0]
    assert head.score(X[:2], [first, "fox"]) == 0.5  # a label the fit never saw is a miss, as in sklearn
    with pytest.raises(ValueError, match=r"labels the head was not fitted on: \['fox'\]"):
        index_labels(["cat", "fox"], head.classes_)


def test_num_classes_keeps_classes_without_train_rows():
    X, y = blobs()
    y6 = np.array([0, 2, 5])[y]
    crt = CRT(epochs=2, device="cpu").fit(X, y6, num_classes=6)
    np.testing.assert_array_equal(crt.classes_, np.arange(6))
    assert crt.weight_.shape == (6, 4) and crt.predict_proba(X).shape == (len(X), 6)
    assert set(crt.predict(X).tolist()) <= {0, 2, 5}  # rows 1, 3, 4 never train
    without = CRT(epochs=2, device="cpu").fit(X, y6)
    np.testing.assert_array_equal(without.classes_, [0, 2, 5])
    assert without.weight_.shape == (3, 4)


def test_labels_already_indices_are_not_copied():
    y = torch.tensor([0, 1, 2, 1, 0])
    classes, idx = encode_labels(y)
    np.testing.assert_array_equal(classes, [0, 1, 2])
    assert idx.data_ptr() == y.data_ptr()  # the CLI's int64 labels pass through
    classes, idx = encode_labels(y, num_classes=4)
    assert len(classes) == 4 and idx.data_ptr() == y.data_ptr()
    head = JointHead(torch.eye(3)).fit()
    X = torch.rand(5, 3)
    pred = head.predict(X)
    assert pred.dtype == torch.int64 and torch.equal(pred, (X @ torch.eye(3)).argmax(1))


# -- outputs: numpy in -> numpy out, torch in -> torch out ------------------------------------------
def _fitted_heads(X, y):
    C, D = len(np.unique(y)), X.shape[1]
    W = np.random.default_rng(1).normal(size=(C, D)).astype(np.float32)
    b = np.linspace(-0.5, 0.5, C).astype(np.float32)
    counts = np.bincount(y)
    joint = JointHead(W, b).fit()
    return {
        "ncm": NCM().fit(X, y),
        "crt": CRT(epochs=3, device="cpu").fit(X, y),
        "lws": LWS(W, b, epochs=2, device="cpu").fit(X, y),
        "tau": TauNorm(W, tau=1.0).fit(),
        "joint": joint,
        "logit_adjust": LogitAdjustment(joint, counts, tau=1.0).fit(),
        "temperature": TemperatureScaled(joint, temperature=2.0).fit(),
    }


def test_outputs_follow_the_input_type_and_softmax():
    X, y = blobs()
    Xt = X[:15]
    for name, head in _fitted_heads(X, y).items():
        s = head.scores(Xt)
        assert isinstance(s, np.ndarray) and s.dtype == np.float32 and s.shape == (15, 3), name
        np.testing.assert_allclose(head.predict_proba(Xt), np_softmax(s), rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(head.predict_log_proba(Xt), np.log(np_softmax(s)), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(head.predict(Xt), s.argmax(1))
        np.testing.assert_array_equal(head.decision_function(Xt), s)  # (N, C) for more than two classes
        st = head.scores(torch.from_numpy(Xt).float())
        assert isinstance(st, torch.Tensor) and isinstance(head.predict(torch.from_numpy(Xt)), torch.Tensor)
        np.testing.assert_allclose(st.numpy(), s, rtol=1e-6)
        assert head.n_features_in_ == 4 and list(head.classes_) == [0, 1, 2]
    ts = _fitted_heads(X, y)["temperature"]
    np.testing.assert_allclose(ts.scores(Xt), (Xt.astype(np.float32) @ ts.head.weight_.numpy().T
                                               + ts.head.bias_.numpy()) / 2.0, rtol=1e-5, atol=1e-6)


def test_binary_decision_function_is_the_margin():
    X, y = blobs((25, 15))
    head = NCM("un").fit(X, np.array(["no", "yes"])[y])
    s, d = head.scores(X), head.decision_function(X)
    assert d.shape == (len(X),)
    np.testing.assert_allclose(d, s[:, 1] - s[:, 0], rtol=1e-6)
    np.testing.assert_array_equal(head.predict(X), np.where(d > 0, "yes", "no"))
    np.testing.assert_array_equal(head.predict(X), np_ncm_predict(X, np.array(["no", "yes"])[y], X, "un"))


def test_score_is_weighted_accuracy():
    X, y = blobs(seed=3, spread=1.0)  # overlapping: some errors
    head = CRT(epochs=3, device="cpu").fit(X, y)
    pred = head.predict(X)
    assert 0 < head.score(X, y) < 1
    assert head.score(X, y) == pytest.approx(np.mean(pred == y))
    w = np.random.default_rng(0).uniform(size=len(y))
    assert head.score(X, y, sample_weight=w) == pytest.approx(np.average(pred == y, weights=w))


def test_deep_params_of_a_head_holding_an_estimator():
    grid = CRTGrid(CRT(epochs=3), [0.1, 0.2], [5e-4])
    p = grid.get_params()
    assert p["estimator__epochs"] == 3 and p["lrs"] == [0.1, 0.2]
    assert "estimator__epochs" not in grid.get_params(deep=False)
    grid.set_params(estimator__epochs=5, lrs=[0.3])
    assert grid.estimator.epochs == 5 and grid.lrs == [0.3]
    with pytest.raises(ValueError, match="invalid parameter 'epochs' for CRTGrid"):
        grid.set_params(epochs=1)


# -- clone, Pipeline, GridSearchCV, cross_val_score ----------------------------------------------
@needs_sklearn
def test_clone_heads_built_on_a_stage1_classifier():
    from sklearn.base import clone

    X, y = blobs()
    heads = _fitted_heads(X, y)
    for name in ("lws", "tau", "joint", "logit_adjust", "temperature"):
        head = heads[name]
        c = clone(head)
        assert not hasattr(c, "classes_"), name  # a fresh, unfitted copy ...
        for k, v in head.get_params(deep=False).items():
            if k == "head":
                assert c.head is v  # ... that shares the fitted base head
            elif hasattr(v, "shape"):
                assert c.get_params()[k] is not v and np.array_equal(np.asarray(c.get_params()[k]), np.asarray(v))
        c.fit(X, y) if name == "lws" else c.fit()
        np.testing.assert_array_equal(c.predict(X), head.predict(X), err_msg=name)


@needs_sklearn
def test_gridsearch_pipeline_ncm_on_string_labels():
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = blobs(seed=2, spread=1.5)
    ylab = np.array(["ant", "bee", "cow"])[y]
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    search = GridSearchCV(make_pipeline(StandardScaler(), NCM()), {"ncm__variant": ["cl2n", "un"]}, cv=cv)
    search.fit(X, ylab)
    for i, variant in enumerate(search.cv_results_["param_ncm__variant"]):
        want = np.mean([np.mean(np_ncm_predict(np_standardize(X[tr], X[tr]), ylab[tr],
                                               np_standardize(X[tr], X[te]), variant) == ylab[te])
                        for tr, te in cv.split(X, ylab)])
        assert search.cv_results_["mean_test_score"][i] == pytest.approx(want, abs=1e-12), variant
    assert set(search.predict(X)) <= {"ant", "bee", "cow"}


@needs_sklearn
def test_cross_val_score_crt_on_string_labels():
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    X, y = blobs(seed=4)
    ylab = np.array(["x", "y", "z"])[y]
    scores = cross_val_score(CRT(device="cpu"), X, ylab)  # every default, including the batch size
    assert scores.shape == (5,) and scores.min() > 0.9
    # the same folds on the integer codes: the labels are only renamed
    folds = StratifiedKFold(5).split(X, y)
    ints = [CRT(device="cpu").fit(X[tr], y[tr]).score(X[te], y[te]) for tr, te in folds]
    np.testing.assert_allclose(scores, ints)


@needs_sklearn
def test_gridsearch_over_a_stage1_head_own_parameters():
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.pipeline import make_pipeline

    X, y = blobs(seed=5, spread=1.0)
    X = X.astype(np.float32)
    W = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32) * np.array([[3.0], [1.0], [0.3]], np.float32)
    cv = KFold(3)
    taus = [0.0, 1.0, 2.0]
    search = GridSearchCV(make_pipeline(TauNorm(W)), {"taunorm__tau": taus}, cv=cv).fit(X, y)
    Wn = [W / np.linalg.norm(W, axis=1, keepdims=True) ** t for t in taus]
    want = [np.mean([np.mean((X[te] @ w.T).argmax(1) == y[te]) for _, te in cv.split(X)]) for w in Wn]
    np.testing.assert_allclose(search.cv_results_["mean_test_score"], want, atol=1e-12)
    assert search.best_params_["taunorm__tau"] == taus[int(np.argmax(want))]

    joint = JointHead(W).fit()
    temps = [2.0, 4.0, 8.0]  # logits mild enough that no probability reaches log_loss's float32 clipping
    ts = GridSearchCV(TemperatureScaled(joint), {"temperature": temps}, cv=cv, scoring="neg_log_loss").fit(X, y)
    nll = [np.mean([-np.mean(np.log(np_softmax(X[te] @ W.T / t)[np.arange(len(te)), y[te]]))
                    for _, te in cv.split(X)]) for t in temps]
    np.testing.assert_allclose(-ts.cv_results_["mean_test_score"], nll, rtol=1e-5)
    assert ts.best_estimator_.head is joint

    counts = np.bincount(y)
    la = GridSearchCV(LogitAdjustment(joint, counts), {"tau": taus}, cv=cv).fit(X, y)
    prior = np.log(counts / counts.sum())
    want = [np.mean([np.mean((X[te] @ W.T - t * prior).argmax(1) == y[te]) for _, te in cv.split(X)]) for t in taus]
    np.testing.assert_allclose(la.cv_results_["mean_test_score"], want, atol=1e-12)


@needs_sklearn
def test_gridsearch_lws_passes_each_candidate_to_a_fresh_clone():
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    X, y = blobs(seed=6, spread=1.0)
    W = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32)
    cv = StratifiedKFold(3)
    lrs = [0.05, 0.5]
    search = GridSearchCV(LWS(W, epochs=3, device="cpu"), {"lr": lrs}, cv=cv).fit(X, y)
    for i, lr in enumerate(lrs):
        want = np.mean([np.mean(LWS(W, epochs=3, lr=lr, device="cpu").fit(X[tr], y[tr]).predict(X[te]) == y[te])
                        for tr, te in cv.split(X, y)])
        assert search.cv_results_["mean_test_score"][i] == pytest.approx(want, abs=1e-12)
    assert search.best_estimator_.lr == lrs[int(np.argmax(search.cv_results_["mean_test_score"]))]
