"""lt_rebalance.evaluation: every number of a head's evaluation comes back as a value."""
import cli_support
import pytest
import torch

from lt_rebalance.evaluation import evaluate_head, evaluate_split
from lt_rebalance.heads import KNN, JointHead
from lt_rebalance.logit_store import LogitStore
from lt_rebalance.protocols import Protocol
from lt_rebalance.session import Session
from lt_rebalance.store import FeatureStore


def test_metrics_equal_numpy_and_the_session_is_not_changed(files, arrays):
    s = Session(FeatureStore(files["full"]))
    head = JointHead(*s.head()).fit()
    ev = evaluate_head(s, head)
    for split in ("val", "test"):
        want = cli_support.np_metrics(arrays[f"x_{split}"] @ arrays["weight"].T + arrays["bias"], arrays[f"y_{split}"])
        for k, v in want.items():
            assert ev.splits[split].metrics[k] == pytest.approx(v, abs=1e-6), (split, k)
    assert ev.samples == {} and ev.protocol is None and set(ev.result()) == {"val", "test"}
    with LogitStore(s) as kept:  # scored from the kept X Wᵀ: the same accuracies
        shared = evaluate_head(s, head, logits=kept)
        assert kept.keys()  # the logits were kept for the splits
    assert shared.splits["test"].metrics["all"] == ev.splits["test"].metrics["all"]


def test_protocol_numbers_and_samples_are_returned(files):
    s = Session(FeatureStore(files["full"]), protocol=Protocol(test_priors=("forward-2",), bootstrap=20))
    ev = evaluate_head(s, JointHead(*s.head()).fit())
    test = ev.splits["test"]
    assert set(test.samples) == {"all", "many", "medium", "few", "mean_class"} and len(test.samples["all"]) == 20
    assert set(test.ci) == set(test.samples) and ev.splits["val"].shifted is None
    assert set(test.shifted_corrected["forward-2"]) == {"known_prior", "em"}
    doc = ev.result()
    assert set(doc["ci"]) == {"val", "test"} and doc["protocol"]["bootstrap"] == 20 and "samples" not in doc


def test_a_head_without_an_implied_prior_says_why(files):
    s = Session(FeatureStore(files["full"]), protocol=Protocol(test_priors=("forward-2", "backward-2")))
    X, y = s.train()
    knn = KNN(k=5).fit(X, y, num_classes=s.num_classes)
    test = evaluate_split(s, knn, "test")
    assert set(test.shifted) == {"forward-2", "backward-2"}
    assert test.shifted_corrected == {"reason": "kNN votes are weighted counts of neighbours, not class "
                                                "posteriors of a known prior"}


def test_test_priors_need_the_test_split(files):
    s = Session(FeatureStore(files["full"]), eval_splits=["val"], protocol=Protocol(test_priors=("uniform",)))
    with pytest.raises(ValueError, match="add it to --splits"):
        evaluate_head(s, JointHead(*s.head()).fit())
    assert torch.is_tensor(s.counts)
