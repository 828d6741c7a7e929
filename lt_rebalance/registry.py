"""The method registry: every method of the toolkit declared once.

An entry says what a method is called (and its older spellings), where its runner and its command
live, what it needs from a feature file, whether it is trained or closed-form, whether ``compare``
runs it by default, what it selects on val and which prior its scores are balanced for. The CLI
(``--help``, ``compare --methods``), the report, the protocols and ``compare`` read from here.

No heavy imports: ``ltr --help`` reads this module. Runners are named as ``"module:function"`` and
imported on use (:func:`runner`). Adding a method: one runner module under
:mod:`lt_rebalance.runners`, one :class:`Method` entry below, its tests (docs/DESIGN.md).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Method:
    """One method.

    ``runner``: ``"module:function"``, called as ``function(session, **options)`` and returning a
    :class:`lt_rebalance.runners.MethodRun`. ``command``: its own ``ltr`` command as
    ``(name, module, attribute)``, or None. ``needs_head``: built on the stored stage-1 classifier
    (``/head``). ``needs_train``: reads the train rows. ``needs_val``: cannot run without val rows
    (``compare`` skips it, with the reason, on a file without them). ``selects``: what it chooses on
    val (None: nothing). ``trained``: trained by SGD (epochs, batch size, ``--seeds``).
    ``default``: run by ``compare`` unless methods are named. ``scored_from_stored``: its scores
    are a per-class affine map of the stored classifier's logits X Wᵀ (scored from the logits
    ``compare`` keeps; its head's :meth:`logit_affine` gives the map). ``trained_on_stored``:
    trained on the joint logits of train and val (LWS, MARC, DisAlign: one cache shared by a run). The
    runner of a method with either takes ``logits`` (a :class:`~lt_rebalance.logit_store.LogitStore`).
    ``needs_text_head``: uses the file's text head (``/text_head``, ``ltr text-head``; ``compare``
    skips it, with the reason, on a file without one).
    ``prior``: the class prior its scores are balanced for (what the shifted-prior correction
    divides out), in words; the head's :meth:`implied_prior` computes it. ``epochs_from``: which of
    ``compare``'s ``--crt-epochs`` / ``--lws-epochs`` sets a trained method's epochs (with
    ``--batch-size``; None: it keeps its own auto schedule).
    """

    name: str
    runner: str
    summary: str
    prior: str
    aliases: tuple[str, ...] = ()
    command: Optional[tuple[str, str, str]] = None
    needs_head: bool = False
    needs_train: bool = False
    needs_val: bool = False
    selects: Optional[str] = None
    trained: bool = False
    default: bool = True
    scored_from_stored: bool = False
    trained_on_stored: bool = False
    epochs_from: Optional[str] = None
    needs_text_head: bool = False
    calibrated: bool = True  # softmax of its scores ~ a posterior; False: EM on them can collapse (NCM, τ-norm)
    # --precision auto may run it in bfloat16: False where its bfloat16 results failed the measured
    # accuracy contract (docs/METHODS.md, "Precision"): the closed-form methods, whose argmax is over
    # logits that PyTorch's CPU GEMM rounds to bfloat16
    auto_bfloat16: bool = True

    @property
    def uses_stored_logits(self) -> bool:
        return self.scored_from_stored or self.trained_on_stored


_RUNNERS = "lt_rebalance.runners"
_METHOD_COMMANDS = "lt_rebalance.commands.methods"
_CLASSIFIER_COMMANDS = "lt_rebalance.commands.classifiers"
_POSTHOC_COMMANDS = "lt_rebalance.commands.posthoc"
_TEXT = f"{_RUNNERS}.text"

# in the order ``compare`` runs them
METHODS: tuple[Method, ...] = (
    Method("joint", f"{_RUNNERS}.stored_head:run_joint", "Evaluate the stored stage-1 (joint) classifier.",
           prior="the train prior π", command=("joint", _METHOD_COMMANDS, "joint"), needs_head=True,
           scored_from_stored=True, auto_bfloat16=False),
    Method("ncm", f"{_RUNNERS}.features:run_ncm", "Nearest class mean classifier on the cached features.",
           prior="uniform (one mean per class, whatever its size)", command=("ncm", _METHOD_COMMANDS, "ncm"),
           needs_train=True, calibrated=False, auto_bfloat16=False),
    Method("crt", f"{_RUNNERS}.trained:run_crt", "Re-train the linear classifier with class-balanced sampling.",
           prior="the sampler's p_j ∝ n_j^q (class-balanced: uniform), with the loss's re-weighting",
           command=("crt", _METHOD_COMMANDS, "crt"), needs_train=True, selects="the best epoch (keep-best)",
           trained=True, epochs_from="crt"),
    Method("tau_norm", f"{_RUNNERS}.stored_head:run_tau_norm",
           "tau-normalise the stored classifier over a grid of tau.", prior="uniform",
           aliases=("tau", "tau-norm", "tau-sweep"), command=("tau-sweep", _METHOD_COMMANDS, "tau_sweep"),
           needs_head=True, needs_val=True, selects="tau", scored_from_stored=True, calibrated=False, auto_bfloat16=False),
    Method("lws", f"{_RUNNERS}.trained:run_lws", "Learnable weight scaling on the frozen stored classifier.",
           prior="the sampler's p_j ∝ n_j^q (class-balanced: uniform)", command=("lws", _METHOD_COMMANDS, "lws"),
           needs_head=True, needs_train=True, selects="the best epoch (keep-best)", trained=True,
           scored_from_stored=True, trained_on_stored=True, epochs_from="lws"),
    Method("logit_adjust", f"{_RUNNERS}.stored_head:run_logit_adjust",
           "Logit adjustment (z - tau log prior) over a grid of tau.", prior="π^(1 − τ) (τ selected on val)",
           aliases=("logit-adjust",), command=("logit-adjust", _POSTHOC_COMMANDS, "logit_adjust"),
           needs_head=True, needs_val=True, selects="tau", scored_from_stored=True, auto_bfloat16=False),
    Method("pc_softmax", f"{_RUNNERS}.stored_head:run_pc_softmax",
           "PC softmax: the stored classifier's logits minus log prior.", prior="uniform",
           aliases=("pc-softmax",), needs_head=True, scored_from_stored=True, auto_bfloat16=False),
    Method("marc", f"{_RUNNERS}.trained:run_marc",
           "MARC: per-class scale and norm margin on the stored classifier.",
           prior="the sampler's p_j ∝ n_j^q (class-balanced: uniform)",
           command=("marc", _CLASSIFIER_COMMANDS, "marc"), needs_head=True, needs_train=True,
           selects="the best epoch (keep-best)", trained=True, scored_from_stored=True, trained_on_stored=True,
           epochs_from="lws"),
    # opt-in: each costs more than the rest of the study on ImageNet-LT-sized files on a CPU (weight
    # balancing: the authors' 10 full epochs in steps of 64 rows, which --crt-epochs does not shorten;
    # kNN: one eval x train similarity GEMM; the probe: up to max_iter passes of two GEMMs)
    Method("wb", f"{_RUNNERS}.trained:run_wb",
           "Weight balancing stage 2: fine-tune with weight decay and MaxNorm.",
           prior="the sampler's p_j ∝ n_j^q times the class-balanced loss weights", aliases=("weight-balancing",),
           command=("wb", _CLASSIFIER_COMMANDS, "wb"), needs_head=True, needs_train=True,
           selects="the best epoch (keep-best)", trained=True, default=False),
    # opt-in as a later method (not one of the default study's); trained on the joint logits (and the
    # features, for its gate); not scored from the kept logits (its gate depends on x); its own "auto"
    # schedule (the authors' 10 epochs of batch 256)
    Method("disalign", f"{_RUNNERS}.trained:run_disalign",
           "DisAlign: confidence-gated per-class scale and bias on the stored classifier.",
           prior="p_j ∝ n_j^(1 − ρ) with the GRW loss and instance-balanced sampling (the sampler's p_j ∝ n_j^q "
                 "times n_j^−ρ; ρ = 1: uniform)",
           command=("disalign", _CLASSIFIER_COMMANDS, "disalign"), needs_head=True, needs_train=True,
           selects="the best epoch (keep-best)", trained=True, default=False, trained_on_stored=True),
    Method("experts", f"{_RUNNERS}.experts:run_experts",
           "Logit-adjusted experts of the stored classifier, weighted for the estimated test prior.",
           prior="none fixed: the combination adapts to the test prior it estimates", needs_head=True,
           selects="the experts' weights, on the rows it scores (no labels)", default=False, auto_bfloat16=False),
    Method("knn", f"{_RUNNERS}.features:run_knn", "Weighted kNN vote (exp(sim / T)) over the train rows.",
           prior="none: kNN votes are counts of neighbours, not posteriors of a known prior",
           command=("knn", _CLASSIFIER_COMMANDS, "knn"), needs_train=True, default=False, auto_bfloat16=False),
    Method("linear_probe", f"{_RUNNERS}.features:run_linear_probe",
           "L-BFGS logistic regression, scikit-learn's objective.",
           prior="uniform with class_weight 'balanced' (the default), π with 'none'", aliases=("linear-probe",),
           command=("linear-probe", _CLASSIFIER_COMMANDS, "linear_probe"), needs_train=True,
           selects="C (with --C-grid)", default=False, auto_bfloat16=False),
    # opt-in: they need a text head (ltr text-head), which most files do not have
    Method("zero_shot", f"{_TEXT}:run_zero_shot", "Zero-shot: logit scale x cosine of features and class-name text.",
           prior="the pre-training data's label prior (unknown; zero_shot_debiased estimates it)",
           aliases=("zero-shot", "zeroshot"), default=False, needs_text_head=True),
    Method("zero_shot_debiased", f"{_TEXT}:run_zero_shot_debiased",
           "Zero-shot minus tau log q, q the pre-training prior estimated on val (GLA).",
           prior="q^(1 − τ) of the estimated pre-training prior q (uniform at τ = 1)",
           aliases=("zero-shot-debiased",), needs_val=True,
           selects="tau (the temperature and the prior q are estimated on val too)", default=False,
           needs_text_head=True),
    Method("gla", f"{_TEXT}:run_gla", "GLA: debiased zero-shot plus a trained classifier, both priors removed.",
           prior="uniform (the pre-training prior and the classifier's prior are both removed)",
           needs_train=True, needs_val=True, selects="the temperature and the prior q (estimated on val)",
           default=False, needs_text_head=True),
    Method("text_init", f"{_TEXT}:run_text_init",
           "LIFT: cosine classifier initialised from the text head, logit-adjusted loss.",
           prior="the sampler's p_j ∝ n_j^q divided by π_j (instance-balanced: uniform)", aliases=("text-init",),
           needs_train=True, selects="the best epoch (keep-best)", trained=True, default=False,
           needs_text_head=True),
)
BY_NAME: dict[str, Method] = {m.name: m for m in METHODS}
ALIASES: dict[str, str] = {a: m.name for m in METHODS for a in m.aliases}

METHOD_NAMES = tuple(m.name for m in METHODS)
DEFAULT_METHODS = tuple(m.name for m in METHODS if m.default)
OPT_IN_METHODS = tuple(m.name for m in METHODS if not m.default)
TRAINED_METHODS = tuple(m.name for m in METHODS if m.trained)
HEAD_METHODS = tuple(m.name for m in METHODS if m.needs_head)


def canonical_method(name: str) -> str:
    """``name`` or its alias as the canonical method name; ValueError for an unknown one."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in BY_NAME:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)} "
                         f"(aliases: {', '.join(f'{a}={c}' for a, c in ALIASES.items())})")
    return key


def get(name: str) -> Method:
    """The entry of ``name`` (canonical or alias); ValueError for an unknown one."""
    return BY_NAME[canonical_method(name)]


def parse_methods(text: str) -> list[str]:
    """'joint, tau,crt' -> ['joint', 'tau_norm', 'crt'] (canonical, duplicates dropped, order kept)."""
    out: list[str] = []
    for part in text.split(","):
        if part.strip() and (name := canonical_method(part)) not in out:
            out.append(name)
    return out


def schedule_options(crt_epochs: Any = "auto", lws_epochs: Any = "auto", batch_size: Any = "auto"
                     ) -> dict[str, dict]:
    """Runner options of every trained method from ``compare``'s schedule flags: epochs (by its
    ``epochs_from``) and batch size; a method without ``epochs_from`` (weight balancing: the authors'
    10 epochs of batch 64, lengthened on small files) keeps its own schedule."""
    epochs = {"crt": crt_epochs, "lws": lws_epochs}
    return {m.name: ({"epochs": epochs[m.epochs_from], "batch_size": batch_size} if m.epochs_from else {})
            for m in METHODS if m.trained}


def runner(name: str) -> Callable[..., Any]:
    """The runner function of method ``name`` (imports its module)."""
    module, attr = get(name).runner.split(":")
    return getattr(importlib.import_module(module), attr)


def method_commands() -> dict[str, tuple[str, str, str]]:
    """``ltr`` command name -> (module, attribute, one-line help) of every method with a command."""
    return {m.command[0]: (m.command[1], m.command[2], m.summary) for m in METHODS if m.command}
