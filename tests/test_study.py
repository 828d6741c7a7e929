"""lt_rebalance.study: compare's skip rules from the registry, and the MARC prior-correction case."""

from lt_rebalance.protocols import Protocol
from lt_rebalance.session import Session
from lt_rebalance.store import FeatureStore
from lt_rebalance.study import compare

FAST = {m: {"epochs": 1, "batch_size": 64} for m in ("crt", "lws", "marc")}


def test_methods_skipped_with_the_reason_from_their_needs(files):
    doc = compare(Session(FeatureStore(files["noval"])), ["joint", "tau_norm", "logit_adjust"], FAST)
    assert [r["method"] for r in doc["rows"]] == ["joint"]
    assert {s["method"]: s["reason"] for s in doc["skipped"]} == {
        "tau_norm": "tau_norm selects tau on val, and the file has no val rows",
        "logit_adjust": "logit_adjust selects tau on val, and the file has no val rows"}
    doc = compare(Session(FeatureStore(files["nohead"])), ["joint", "ncm", "marc"], FAST)
    assert [r["method"] for r in doc["rows"]] == ["ncm"]
    assert all(s["reason"] == "the file has no stored classifier" for s in doc["skipped"])


def test_every_default_method_answers_the_prior_correction(files):
    """The MARC case of issue 20: every row has corrected numbers or a reason, none is silently missing."""
    s = Session(FeatureStore(files["full"]), protocol=Protocol(test_priors=("forward-2", "backward-2")))
    doc = compare(s, ["joint", "ncm", "crt", "tau_norm", "lws", "logit_adjust", "pc_softmax", "marc", "knn"], FAST)
    for row in doc["rows"]:
        corrected = row["shifted_corrected"]
        if row["method"] == "knn":
            assert "reason" in corrected
        else:
            assert set(corrected) == {"forward-2", "backward-2"}, row["method"]
            assert {"known_prior", "em"} <= set(corrected["forward-2"])
