"""What every head shares (lt_rebalance.heads.base): parameters, validation messages, fitted checks."""
from __future__ import annotations

import numpy as np
import pytest

from lt_rebalance.heads import CRT, DEFAULT_TAUS, LWS, NCM, JointHead, TauNorm
from lt_rebalance.heads.base import NotFittedError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


W4 = np.eye(4, dtype=np.float32)
X4 = np.eye(4, dtype=np.float32)
Y4 = np.arange(4)


@pytest.mark.parametrize(
    "make,fit,pattern",
    [
        (lambda: CRT(epochs=0), lambda h: h.fit(X4, Y4), r"CRT: epochs must be an int in \[1, inf\] or one of 'auto'; got 0"),
        (lambda: CRT(epochs=2.5), lambda h: h.fit(X4, Y4), r"epochs must be an int.*got 2.5"),
        (lambda: CRT(lr=0), lambda h: h.fit(X4, Y4), r"CRT: lr must be a number in \(0, inf\); got 0"),
        (lambda: CRT(sampler="balanced"), lambda h: h.fit(X4, Y4), r"sampler must be 'ib', 'cb'.*got 'balanced'"),
        (lambda: CRT(schedule="step"), lambda h: h.fit(X4, Y4), r"schedule must be one of .*'cosine'.*got 'step'"),
        (lambda: CRT(momentum=1.0), lambda h: h.fit(X4, Y4), r"momentum must be .*got 1.0"),
        (lambda: CRT(loss="focal"), lambda h: h.fit(X4, Y4), r"loss must be one of .*got 'focal'"),
        (lambda: CRT(batch_size=4, device="cpu"), lambda h: h.fit(X4, [0, 1, 2, 7], num_classes=5),
         r"labels must lie in \[0, 5\); got range \[0, 7\]"),
        (lambda: CRT(batch_size=4, device="cpu"), lambda h: h.fit(X4, [0, 1, -1, 2], num_classes=3),
         r"labels must lie in \[0, 3\)"),
        (lambda: CRT(batch_size=4, device="cpu"), lambda h: h.fit(X4, [0, 1, 0.5, 2]), r"Unknown label type: continuous"),
        (lambda: NCM("cosine"), lambda h: h.fit(X4, Y4), r"NCM: variant must be one of 'cl2n', 'cos', 'l2n', 'un'"),
        (lambda: LWS(W4, epochs=0), lambda h: h.fit(X4, Y4), r"LWS: epochs must be an int in \[1, inf\] or one of 'auto'; got 0"),
        (lambda: LWS(W4, sampler="x"), lambda h: h.fit(X4, Y4), r"LWS: sampler must be"),
        (lambda: LWS(W4, device="cpu"), lambda h: h.fit(X4[:, :3], Y4), r"X has 3 features, but weight is expecting 4"),
        (lambda: TauNorm("W"), lambda h: h.fit(), r"TauNorm: weight must be an array or tensor"),
        (lambda: JointHead(W4, np.zeros(3)), lambda h: h.fit(), r"bias must be an array or tensor|shape \(4,\)"),
    ],
)
def test_parameter_validation_messages(make, fit, pattern):
    with pytest.raises(ValueError, match=pattern):
        fit(make())


def test_batch_size_larger_than_train_set():
    with pytest.raises(ValueError, match=r"batch_size=8 is larger than the 4 train rows"):
        CRT(batch_size=8, device="cpu").fit(X4, Y4)
    # the default batch ("auto", 512) shrinks on the 4 rows: to max(1, 4 // 8) = 1, 4 batches an epoch
    with pytest.warns(UserWarning, match="only 12 optimiser steps"):
        h = CRT(epochs=3, device="cpu").fit(X4, Y4)
    assert len(h.history_.loss) == 3 and (h.schedule_.batch_size, h.schedule_.batches_per_epoch) == (1, 4)


def test_features_must_be_finite_and_2d():
    X = X4.copy()
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        NCM().fit(X, Y4)
    with pytest.raises(ValueError, match="2-D"):
        NCM().fit(np.zeros(4), Y4)
    with pytest.raises(ValueError, match="labels must have shape"):
        NCM().fit(X4, Y4[:3])


def test_get_and_set_params():
    h = CRT()
    p = h.get_params()
    assert p["epochs"] == "auto" and p["lr"] == 0.2 and p["batch_size"] == "auto" and p["momentum"] == 0.9
    assert p["weight_decay"] == 5e-4 and p["sampler"] == "cb" and p["schedule"] == "cosine" and p["keep_best"]
    assert h.set_params(lr=0.05, epochs=3) is h
    assert h.get_params()["lr"] == 0.05 and h.epochs == 3
    with pytest.raises(ValueError, match="invalid parameter 'learning_rate'"):
        h.set_params(learning_rate=1.0)
    assert NCM().get_params() == {"variant": "cl2n", "device": "cpu", "precision": "float32"}
    lws = LWS(W4)
    assert lws.get_params()["epochs"] == "auto" and lws.get_params()["weight"] is W4
    assert TauNorm(W4).get_params()["taus"] == DEFAULT_TAUS
    # a copy from get_params behaves the same
    clone = CRT(**{**h.get_params(), "device": "cpu", "batch_size": 2})
    assert clone.get_params()["lr"] == 0.05
    assert "lr=0.05" in repr(h) and "epochs=3" in repr(h)


@pytest.mark.parametrize(
    "head", [CRT(), NCM(), LWS(W4), TauNorm(W4, tau=1.0), JointHead(W4)], ids=lambda h: type(h).__name__
)
def test_predict_before_fit_raises(head):
    for call in (head.predict, head.decision_function):
        with pytest.raises(NotFittedError, match="not fitted yet; call fit first"):
            call(X4)


def test_fit_returns_self_and_head_evaluate():
    for head, fit in ((NCM(), lambda h: h.fit(X4, Y4)), (JointHead(W4), lambda h: h.fit()),
                      (TauNorm(W4, tau=0.5), lambda h: h.fit())):
        assert fit(head) is head
        out = head.evaluate(X4, Y4, [200, 50, 50, 5])
        assert out["all"] == 1.0 and out["few"] == 1.0 and out["many"] == 1.0
