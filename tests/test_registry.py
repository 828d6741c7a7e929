"""lt_rebalance.registry: one declaration per method, read by the CLI, compare and the protocols."""
import subprocess
import sys

import numpy as np
import pytest

from lt_rebalance import registry
from lt_rebalance.cli import COMMANDS


def test_every_entry_is_complete_and_its_runner_exists():
    names = [m.name for m in registry.METHODS]
    assert len(set(names)) == len(names) and set(registry.ALIASES).isdisjoint(names)
    for m in registry.METHODS:
        run = registry.runner(m.name)
        assert run.__name__ == m.runner.split(":")[1] and m.summary and m.prior
        if m.trained_on_stored:  # training on the stored classifier's logits needs that classifier
            assert m.needs_head and m.trained
        if m.scored_from_stored:
            assert m.needs_head
        if m.epochs_from:
            assert m.trained and m.epochs_from in ("crt", "lws")


def test_derived_tables():
    assert registry.DEFAULT_METHODS == ("joint", "ncm", "crt", "tau_norm", "lws", "logit_adjust", "pc_softmax", "marc")
    assert registry.OPT_IN_METHODS == ("wb", "disalign", "experts", "knn", "linear_probe", "zero_shot",
                                       "zero_shot_debiased", "gla", "text_init")
    assert registry.TRAINED_METHODS == ("crt", "lws", "marc", "wb", "disalign", "text_init")
    assert tuple(m.name for m in registry.METHODS if m.needs_text_head) == (
        "zero_shot", "zero_shot_debiased", "gla", "text_init")
    assert registry.HEAD_METHODS == ("joint", "tau_norm", "lws", "logit_adjust", "pc_softmax", "marc", "wb",
                                     "disalign", "experts")
    assert registry.get("tau-sweep").name == "tau_norm" and registry.get(" Linear-Probe ").name == "linear_probe"
    with pytest.raises(ValueError, match="unknown method 'taunorm'; choose from joint, ncm"):
        registry.get("taunorm")


def test_schedule_options_follow_epochs_from():
    opts = registry.schedule_options(3, 7, 64)
    assert opts == {"crt": {"epochs": 3, "batch_size": 64}, "lws": {"epochs": 7, "batch_size": 64},
                    "marc": {"epochs": 7, "batch_size": 64}, "wb": {}, "disalign": {}, "text_init": {}}


def test_method_commands_are_the_cli_commands():
    for name, (module, attr, summary) in registry.method_commands().items():
        assert COMMANDS[name] == (module, attr, summary)
    assert {"joint", "ncm", "tau-sweep", "crt", "lws", "marc", "wb", "disalign", "knn", "linear-probe",
            "logit-adjust"} == set(registry.method_commands())


def test_disalign_is_trained_on_the_joint_logits_but_scored_from_features():
    """Its batch loss reads the features for the gate, which the train rows give; its scores are no
    affine map of X Wᵀ (the gate depends on x), so they are not taken from the kept logits."""
    from lt_rebalance.heads import DisAlign

    m = registry.get("disalign")
    assert m.trained_on_stored and not m.scored_from_stored and m.epochs_from is None and not m.default
    assert DisAlign._needs_features and DisAlign(np.ones((2, 3))).logit_affine() is None


def test_registry_and_help_import_no_torch():
    code = ("import sys, lt_rebalance.registry, lt_rebalance.cli; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    subprocess.run([sys.executable, "-c", code], check=True)
