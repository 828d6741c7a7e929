"""Precision policy (lt_rebalance/precision.py) and the bfloat16 products of the heads.

float32 is checked bit for bit against the expressions the kernels used before precision existed;
bfloat16 against an independent numpy computation (operands rounded to bfloat16 by bit arithmetic,
products in float64) and, for whole heads, against their float32 fit on small data.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lt_rebalance import precision as P
from lt_rebalance.blocks import chunked_matmul, class_sums, device_memory, linear_logits, mm
from lt_rebalance.heads import CRT, KNN, LWS, NCM, JointHead, LinearProbe, TauNorm
from lt_rebalance.heads.knn import add_votes
from lt_rebalance.heads.tau_norm import tau_sweep

pytestmark = pytest.mark.filterwarnings("ignore::lt_rebalance.heads.training.FewStepsWarning")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

AMD_FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
AMX_FLAGS = "processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n"
OLD_FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"


@pytest.fixture
def units(monkeypatch):
    """Set whether the CPU 'has' bfloat16 units: ``units(True|False)``."""
    def set_(value: bool) -> None:
        monkeypatch.setattr(P, "_cpu_bf16_cached", lambda: value)
    return set_


# -- detection and resolution ----------------------------------------------------------------------
def test_cpu_flags_and_units_from_stubbed_cpuinfo():
    assert "avx512_bf16" in P.cpu_flags(AMD_FLAGS)
    assert P.cpu_has_bf16_units(AMD_FLAGS, mkldnn_bf16=True)
    assert P.cpu_has_bf16_units(AMX_FLAGS, mkldnn_bf16=True)
    assert not P.cpu_has_bf16_units(AMX_FLAGS, mkldnn_bf16=False)  # no oneDNN bfloat16 kernels
    assert not P.cpu_has_bf16_units(OLD_FLAGS, mkldnn_bf16=True)  # AVX512 without the bf16 extension
    assert not P.cpu_has_bf16_units("", mkldnn_bf16=True)


def test_resolve_precision_policy(units):
    units(True)
    assert P.resolve_precision("auto", "cpu", "crt") == "bfloat16"
    assert P.resolve_precision("auto", "cpu", None) == "bfloat16"
    from lt_rebalance.registry import METHODS

    float32_under_auto = {m.name for m in METHODS if not m.auto_bfloat16}
    assert {"crt", "lws", "marc"}.isdisjoint(float32_under_auto)  # measured within the contract
    assert float32_under_auto == {"joint", "tau_norm", "logit_adjust", "pc_softmax", "ncm", "knn", "experts",
                                  "linear_probe"}  # measured outside it (docs/METHODS.md, "Precision")
    for m in float32_under_auto:  # methods failing the accuracy contract stay float32 under auto
        assert P.resolve_precision("auto", "cpu", m) == "float32"
        assert P.resolve_precision("bfloat16", "cpu", m) == "bfloat16"  # an explicit choice is kept
    assert P.resolve_precision("tf32", "cpu") == "float32"  # no TF32 on a CPU
    assert P.resolve_precision("FLOAT32", "cpu") == "float32"
    units(False)
    assert P.resolve_precision("auto", "cpu", "crt") == "float32"
    assert P.resolve_precision("bfloat16", "cpu", "crt") == "bfloat16"
    with pytest.raises(ValueError, match="float32, bfloat16, tf32, auto"):
        P.resolve_precision("half", "cpu")


@pytest.mark.parametrize("capability, expected", [((7, 5), "float32"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16")])
def test_cuda_capability_decides(monkeypatch, capability, expected):
    monkeypatch.setattr(P, "cuda_capability", lambda dev: capability)
    assert P.resolve_precision("auto", "cuda:0", "crt") == expected
    assert P.resolve_precision("tf32", "cuda:0") == ("tf32" if expected == "bfloat16" else "float32")


def test_hardware_note_and_warning(units):
    units(False)
    note = P.hardware_note("bfloat16", "cpu")
    assert note and "\n" not in note and "bfloat16" in note
    with pytest.warns(P.PrecisionWarning):
        P.fit_precision("bfloat16", "cpu", "crt")
    units(True)
    assert P.hardware_note("bfloat16", "cpu") is None
    assert P.hardware_note("auto", "cpu") is None and P.hardware_note("float32", "cpu") is None


def test_cli_choices_agree_with_library():
    from lt_rebalance.commands.options import PRECISIONS

    assert PRECISIONS == P.PRECISIONS


# -- kernels: float32 bit for bit, bfloat16 against numpy --------------------------------------------
def _bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), by bit arithmetic, returned as float64."""
    u = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def _data(n=300, d=48, c=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(c, d, generator=g), torch.randn(c, generator=g)


def test_float32_is_the_previous_expression_bit_for_bit():
    X, W, b = _data()
    assert torch.equal(linear_logits(X, W, b, precision="float32"), torch.addmm(b[:, None], W, X.T).T)
    assert torch.equal(linear_logits(X.half(), W, precision="float32"), torch.mm(W, X.half().float().T).T)
    assert torch.equal(mm(X, W.T, "float32"), X @ W.T)
    got = []
    chunked_matmul(X, W, lambda z, s: got.append(z.clone()), chunk=128, precision="float32")
    assert torch.equal(torch.cat(got), torch.cat([X[s] @ W.T for s in (slice(0, 128), slice(128, 256),
                                                                       slice(256, 300))]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bfloat16_products_match_numpy(dtype):
    X, W, b = _data()
    X = X.to(dtype)
    ref = _bf16_round(X.float().numpy()) @ _bf16_round(W.numpy()).T  # float64 product of rounded operands
    scale = np.abs(ref).max()
    z = linear_logits(X, W, precision="bfloat16", chunk=100).double().numpy()
    assert np.abs(z - ref).max() <= 2**-8 * scale  # one bfloat16 rounding of the result at most
    zb = linear_logits(X, W, b, precision="bfloat16").double().numpy()
    assert np.abs(zb - (ref + b.double().numpy())).max() <= 2**-8 * scale + 1e-6
    got = []
    chunked_matmul(X, W, lambda s_z, s: got.append(s_z), chunk=64, precision="bfloat16")
    assert torch.cat(got).dtype == torch.float32
    assert np.abs(torch.cat(got).double().numpy() - ref).max() <= 2**-8 * scale


def test_deterministic_sums_equal_the_atomic_forms():
    g = torch.Generator().manual_seed(1)
    Z, y = torch.randn(700, 9, generator=g), torch.randint(0, 11, (700,), generator=g)
    ref = np.zeros((11, 9))
    np.add.at(ref, y.numpy(), Z.double().numpy())
    for one_hot in (False, True):
        out = class_sums(torch.zeros(11, 9), y, Z, one_hot=one_hot)
        assert np.allclose(out.numpy(), ref, atol=1e-5)
    lab, w = torch.randint(0, 7, (40, 20), generator=g), torch.rand(40, 20, generator=g)
    by_col = add_votes(torch.zeros(40, 7), lab, w, by_column=True)
    assert torch.equal(by_col, add_votes(torch.zeros(40, 7), lab, w, by_column=False))  # same order, same bits
    votes = np.zeros((40, 7))
    for i in range(40):
        for j in range(20):
            votes[i, lab[i, j]] += w[i, j].item()
    assert np.allclose(by_col.numpy(), votes, atol=1e-6)


# -- heads: bfloat16 within the contract on small data ---------------------------------------------
@pytest.fixture(scope="module")
def lt(lt_data):
    d = lt_data(num_classes=20, n_max=400, imbalance=20, dim=64, sep=4.0, n_eval_per_class=60, seed=3)
    W = torch.as_tensor(d["means"], dtype=torch.float32) * torch.linspace(1.5, 0.5, 20)[:, None]
    return d, W


def _agree(a, b) -> float:
    return float((np.asarray(a) == np.asarray(b)).mean())


def test_closed_form_heads_bfloat16_agree(lt):
    d, W = lt
    Xt = d["X_test"]
    f32 = JointHead(W).fit().predict(Xt)
    assert _agree(JointHead(W, precision="bfloat16").fit().predict(Xt), f32) >= 0.99
    t32 = TauNorm(W).fit(d["X_val"], d["y_val"], d["counts"])
    t16 = TauNorm(W, precision="bfloat16").fit(d["X_val"], d["y_val"], d["counts"])
    assert t16.precision_ == "bfloat16" and t16.tau_ == t32.tau_
    assert _agree(t16.predict(Xt), t32.predict(Xt)) >= 0.99
    n32 = NCM().fit(d["X_train"], d["y_train"])
    n16 = NCM(precision="bfloat16").fit(d["X_train"], d["y_train"])
    assert torch.equal(torch.as_tensor(n16.centroids_), torch.as_tensor(n32.centroids_))  # fit: float32 sums
    assert _agree(n16.predict(Xt), n32.predict(Xt)) >= 0.99
    k16 = KNN(precision="bfloat16").fit(d["X_train"], d["y_train"])
    assert k16.train_features_.dtype == torch.bfloat16
    assert _agree(k16.predict(Xt), KNN().fit(d["X_train"], d["y_train"]).predict(Xt)) >= 0.97


def test_tau_sweep_bfloat16_curve_matches_numpy(lt):
    d, W = lt
    X, y = torch.as_tensor(d["X_val"]), torch.as_tensor(d["y_val"])
    curve = tau_sweep(X, y, W, d["counts"], [0.0, 1.0], precision="bfloat16")
    z = _bf16_round(X.numpy()) @ _bf16_round(W.numpy()).T
    norms = np.linalg.norm(W.double().numpy(), axis=1)
    for i, tau in enumerate([0.0, 1.0]):
        acc = (np.argmax(z / norms**tau, 1) == y.numpy()).mean()
        assert abs(curve["all"][i].item() - acc) <= 2 / len(y)  # at most a near-tie or two apart


def test_trained_heads_bfloat16_within_contract(lt, torch_one_thread):
    d, W = lt
    Xt, yt = d["X_test"], d["y_test"]
    fit = (d["X_train"], d["y_train"], d["X_val"], d["y_val"])
    for make in (lambda p: CRT(epochs=3, precision=p, device="cpu"),
                 lambda p: LWS(W, epochs=3, precision=p, device="cpu")):
        a32 = make("float32").fit(*fit).score(Xt, yt)
        h16 = make("bfloat16").fit(*fit)
        assert h16.precision_ == "bfloat16"
        assert abs(h16.score(Xt, yt) - a32) <= 0.02
    p32 = LinearProbe(max_iter=30, device="cpu").fit(d["X_train"], d["y_train"])
    p16 = LinearProbe(max_iter=30, precision="bfloat16", device="cpu").fit(d["X_train"], d["y_train"])
    assert abs(p16.score(Xt, yt) - p32.score(Xt, yt)) <= 0.03


def test_float32_heads_unchanged_by_the_parameter(lt, torch_one_thread):
    d, W = lt
    fit = (d["X_train"], d["y_train"], d["X_val"], d["y_val"])
    a, b = CRT(epochs=2, device="cpu").fit(*fit), CRT(epochs=2, device="cpu", precision="float32").fit(*fit)
    assert torch.equal(a.weight_, b.weight_) and a.precision_ == "float32"


def test_auto_without_units_is_float32_bit_for_bit(lt, units, torch_one_thread):
    d, W = lt
    units(False)
    fit = (d["X_train"], d["y_train"], d["X_val"], d["y_val"])
    a, b = LWS(W, epochs=2, device="cpu").fit(*fit), LWS(W, epochs=2, device="cpu", precision="auto").fit(*fit)
    assert b.precision_ == "float32" and torch.equal(a.scales_, b.scales_)


# -- memory budgets and device keys (CUDA stubbed) ---------------------------------------------------
def test_budgets_from_stubbed_mem_get_info(monkeypatch):
    from lt_rebalance.heads.lws import cache_budget

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**30, 16 * 2**30))
    assert device_memory("cuda:0") == 3 * 2**30
    assert cache_budget(None, torch.device("cuda:0")) == pytest.approx(0.8 * 3 * 2**30)
    assert cache_budget(2.0, torch.device("cuda:0")) == 2 * 2**30
    assert device_memory("cpu") != 3 * 2**30  # the host's MemAvailable, not the GPU's


def test_session_device_budget_stubbed(monkeypatch, feature_file):
    from lt_rebalance import devices
    from lt_rebalance.session import Session
    from lt_rebalance.store import FeatureStore

    path, _ = feature_file()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    s = Session(FeatureStore(path), device="cuda", max_memory=2**40)
    assert s.device_budget == 5 * 2**30
    assert Session(FeatureStore(path), device="cpu", max_memory=2**30).device_budget == 2**30
    assert devices.canonical_device("cuda") == torch.device("cuda:1")
    assert devices.canonical_device("cuda:0") == torch.device("cuda:0")
    assert devices.canonical_device("cpu") == torch.device("cpu")


@CUDA
def test_cuda_eval_keys_and_determinism(feature_file):
    from lt_rebalance.logit_store import LogitStore
    from lt_rebalance.session import Session
    from lt_rebalance.store import FeatureStore

    path, arrays = feature_file(C=6, D=8)
    s = Session(FeatureStore(path), device="cuda")
    with LogitStore(s) as store:
        a = store.eval_logits("test", "cuda")
        assert store.eval_logits("test", "cuda:0") is a and len(store.keys()) == 1
    X, y = arrays["X_train"], arrays["y_train"]
    c = [NCM(device="cuda").fit(X, y).centroids_ for _ in range(2)]
    assert torch.equal(c[0], c[1])
    v = [KNN(device="cuda").fit(X, y).scores(torch.as_tensor(X).cuda()) for _ in range(2)]
    assert torch.equal(v[0], v[1])


# -- the command line --------------------------------------------------------------------------------
def _invoke(args):
    from lt_rebalance.cli import main

    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    return runner.invoke(main, [str(a) for a in args])


def test_cli_bad_precision_is_a_usage_error(feature_file):
    path, _ = feature_file()
    r = _invoke(["ncm", "-f", path, "--precision", "half"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    for choice in P.PRECISIONS:
        assert choice in r.stderr


def test_cli_forced_bfloat16_without_units_warns_once(feature_file, units):
    units(False)
    path, _ = feature_file()
    r = _invoke(["ncm", "-f", path, "--precision", "bfloat16", "--json"])
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if "--precision bfloat16" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:"), r.stderr
    assert json.loads(r.stdout)["precision"] == "bfloat16"
    r = _invoke(["ncm", "-f", path, "--precision", "auto", "--json"])
    assert r.exit_code == 0 and "--precision" not in r.stderr and json.loads(r.stdout)["precision"] == "float32"


def test_cli_records_the_precision(feature_file, units):
    units(True)
    path, _ = feature_file()
    r = _invoke(["compare", "-f", path, "--methods", "joint,ncm,crt", "--precision", "auto", "--json", "-q",
                 "--crt-epochs", "1", "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    rows = {row["method"]: row for row in json.loads(r.stdout)["rows"]}
    for m in ("joint", "ncm"):
        assert rows[m]["precision"] == P.resolve_precision("auto", "cpu", m)
    assert rows["crt"]["params"]["precision"] == "bfloat16"
