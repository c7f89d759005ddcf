"""Muon: batched Newton-Schulz orthogonalisation and the stacked update of equal-shape matrices."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import math

import pytest
import torch

from speedrun import optimizer as optimizer_mod
from speedrun import train as train_mod
from speedrun.errors import ParamError
from speedrun.optimizer import (
    Muon,
    _ns_fn,
    build_optimizers,
    newton_schulz,
    normuon,
    set_lr,
)
from speedrun.params import parse_section
from speedrun.train import TrainParams


@pytest.mark.parametrize("shape", [(6, 24, 40), (6, 40, 24), (5, 32, 32)])
def test_batched_newton_schulz_equals_per_matrix(shape):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=g)
    G[1] *= 1000.0  # a matrix of another scale: normalisation must be per matrix
    G[2] *= 1e-3
    batched = newton_schulz(G, 5)
    single = torch.cat([newton_schulz(G[i:i + 1], 5) for i in range(shape[0])])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
    # and a 2-D matrix alone gives the same as its batch slot
    torch.testing.assert_close(newton_schulz(G[3], 5), batched[3], rtol=1e-5, atol=1e-6)


def _singular_values(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(X.double())


@pytest.mark.parametrize("shape", [(4, 64, 16), (4, 16, 64), (4, 96, 48), (3, 3 * 32, 64)])
def test_newton_schulz_is_near_orthogonal(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    s = _singular_values(newton_schulz(G, 5))
    print(shape, f"singular values in [{s.min():.3f}, {s.max():.3f}]")
    assert s.min() > 0.5 and s.max() < 1.5


def test_newton_schulz_flattens_a_spread_spectrum():
    """Square matrices with singular values spread over 0.01..1 (condition number 100) all come out
    near 1 (a far wider spread is not flattened in 5 steps: a 1e-4 relative singular value stays small)."""
    g = torch.Generator().manual_seed(2)
    n = 48
    U, _ = torch.linalg.qr(torch.randn(3, n, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(3, n, n, generator=g))
    S = torch.logspace(-2, 0, n).expand(3, n)
    G = U @ torch.diag_embed(S) @ V.mT
    X = newton_schulz(G, 5)
    s = _singular_values(X)
    print(f"singular values in [{s.min():.3f}, {s.max():.3f}]")
    assert s.min() > 0.5 and s.max() < 1.5
    # same singular vectors: X ~ U V^T (the orthogonal polar factor), not some other orthogonal matrix
    cos = (X * (U @ V.mT)).sum(dim=(-2, -1)) / (X.norm(dim=(-2, -1)) * n ** 0.5)
    assert (cos > 0.9).all(), cos


def test_muon_step_stacks_without_mixing_matrices():
    """Muon's stacked update equals Nesterov momentum + Newton-Schulz applied to each matrix alone,
    for 2-D weights and the 2-D slices of a 3-D [3, h, d] weight, over several steps."""
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 16, 24), (16, 24), (16, 24), (48, 24), (24, 48), (48, 24)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ref]
    lr, mom, ns = 0.02, 0.9, 5
    opt = Muon(params, lr=lr, momentum=mom, ns_steps=ns)
    for _ in range(3):
        grads = [torch.randn(*s, generator=g) for s in shapes]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        for i, (w, gr) in enumerate(zip(ref, grads)):
            bufs[i] = mom * bufs[i] + (1 - mom) * gr
            nesterov = (1 - mom) * gr + mom * bufs[i]
            rows, cols = w.shape[-2:]
            mats = nesterov.reshape(-1, rows, cols)
            upd = torch.stack([newton_schulz(m, ns) for m in mats]).view_as(w)
            w -= lr * max(1.0, rows / cols) ** 0.5 * upd
        for p, w in zip(params, ref):
            torch.testing.assert_close(p.detach(), w, rtol=1e-4, atol=1e-5)


def test_muon_skips_params_without_grad_and_state_round_trips():
    g = torch.Generator().manual_seed(4)
    a, b = (torch.nn.Parameter(torch.randn(8, 8, generator=g)) for _ in range(2))
    opt = Muon([a, b], lr=0.1, momentum=0.5)
    a.grad = torch.randn(8, 8, generator=g)
    b_before = b.detach().clone()
    opt.step()
    assert torch.equal(b.detach(), b_before) and b not in opt.state
    # a resumed optimizer (state_dict round trip) continues identically
    clone_a = torch.nn.Parameter(a.detach().clone())
    opt2 = Muon([clone_a, torch.nn.Parameter(b.detach().clone())], lr=0.1, momentum=0.5)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read from a checkpoint file
    grad = torch.randn(8, 8, generator=g)
    a.grad, clone_a.grad = grad.clone(), grad.clone()
    opt.step()
    opt2.step()
    assert torch.equal(a.detach(), clone_a.detach())


def test_set_lr_scales_every_group_from_its_base():
    w = torch.nn.Parameter(torch.randn(4, 4))
    groups = {"embed": [torch.nn.Parameter(torch.randn(10, 4))], "head": [torch.nn.Parameter(torch.randn(3, 4))],
              "scalar": [torch.nn.Parameter(torch.ones(2))], "hidden": [w]}
    adam, muon = build_optimizers(groups, muon_lr=0.05, muon_momentum=0.85, ns_steps=5, embed_lr=0.6,
                                  head_lr=0.008, scalar_lr=0.04, betas=(0.8, 0.95),
                                  compile=False)
    set_lr((adam, muon), 0.5)
    set_lr((adam, muon), 0.1)  # not compounding: always relative to base_lr
    assert [g["lr"] for g in adam.param_groups] == pytest.approx([0.06, 0.0008, 0.004])
    assert muon.param_groups[0]["lr"] == pytest.approx(0.005)


# ----------------------------------------------------------------------------- recipe switches

def _old_newton_schulz(G: torch.Tensor, steps: int) -> torch.Tensor:
    """The iteration before the recipe switches existed, verbatim: the default must match it bit for bit."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


@pytest.mark.parametrize("shape", [(4, 64, 16), (4, 16, 64), (3, 32, 32)])
def test_default_coefficients_are_bit_identical_to_before(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    for steps in (1, 5, 7):
        old = _old_newton_schulz(G, steps)
        assert torch.equal(newton_schulz(G, steps), old)
        assert torch.equal(_ns_fn(False)(G, steps), old)
        assert torch.equal(_ns_fn(False, "newton-schulz")(G, steps), old)


def _sv_rms_error(X: torch.Tensor) -> float:
    return float((_singular_values(X) - 1).square().mean().sqrt())


@pytest.mark.parametrize("shape", [(4, 64, 16), (4, 16, 64), (4, 96, 48)])
def test_polar_express_is_closer_to_orthogonal_than_newton_schulz(shape):
    """Gaussian matrices (singular values over ~[0.1, 0.4] after normalisation): in 5 steps the fixed
    quintic leaves them in ~[0.68, 1.13] (RMS error ~0.2), Polar Express in ~[0.86, 1.14] (~0.09);
    past its 5 tuples the last one repeats and keeps tightening (8 steps: within ~[0.99, 1.09])."""
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(6))
    ns, pe = newton_schulz(G, 5), newton_schulz(G, 5, "polar-express")
    s = _singular_values(pe)
    print(shape, f"NS rms {_sv_rms_error(ns):.3f}, PE rms {_sv_rms_error(pe):.3f} in [{s.min():.3f}, {s.max():.3f}]")
    assert 0.8 < s.min() and s.max() < 1.2
    assert _sv_rms_error(pe) < 0.12 and _sv_rms_error(pe) < 0.6 * _sv_rms_error(ns)
    s8 = _singular_values(newton_schulz(G, 8, "polar-express"))
    assert 0.95 < s8.min() and s8.max() < 1.1
    # batched equals per matrix, as for the default coefficients
    single = torch.cat([newton_schulz(G[i:i + 1], 5, "polar-express") for i in range(shape[0])])
    torch.testing.assert_close(pe, single, rtol=1e-5, atol=1e-6)


def test_compiled_iteration_is_cached_per_coefficient_set(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    monkeypatch.setattr(optimizer_mod, "_compiled_ns", {})
    ns, pe = _ns_fn(True, "newton-schulz"), _ns_fn(True, "polar-express")
    assert _ns_fn(True, "newton-schulz") is ns and _ns_fn(True, "polar-express") is pe
    assert len(compiled) == 2
    G = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ns(G, 5), newton_schulz(G, 5))
    assert torch.equal(pe(G, 5), newton_schulz(G, 5, "polar-express"))


@pytest.mark.parametrize("shape", [(3, 48, 16), (3, 16, 48), (3, 24, 24)])
def test_normuon_equalises_neurons_and_keeps_the_norm(shape):
    """One statistic per index of the larger dim (rows if rows >= cols): starting from an empty
    second moment, one step leaves every row (tall/square) or column (wide) with the same RMS,
    and each matrix keeps its Frobenius norm; the buffer is an EMA of the mean squares."""
    g = torch.Generator().manual_seed(8)
    rows, cols = shape[-2:]
    dim = -1 if rows >= cols else -2   # reduced over
    U = torch.randn(*shape, generator=g) * torch.rand(*shape[:-2], rows, 1, generator=g) \
        * torch.rand(*shape[:-2], 1, cols, generator=g)   # rows and columns of unequal scale
    second = torch.zeros(U.mean(dim=dim, keepdim=True).shape)
    out, second1 = normuon(U, second, beta2=0.95)
    rms = out.square().mean(dim=dim).sqrt()
    torch.testing.assert_close(rms, rms.mean(dim=-1, keepdim=True).expand_as(rms), rtol=1e-4, atol=0)
    torch.testing.assert_close(out.norm(dim=(-2, -1)), U.norm(dim=(-2, -1)), rtol=1e-5, atol=0)
    torch.testing.assert_close(second1, 0.05 * U.square().mean(dim=dim, keepdim=True))
    U2 = torch.randn(*shape, generator=g)
    out2, second2 = normuon(U2, second1, beta2=0.95)
    torch.testing.assert_close(second2, 0.95 * second1 + 0.05 * U2.square().mean(dim=dim, keepdim=True))
    torch.testing.assert_close(out2.norm(dim=(-2, -1)), U2.norm(dim=(-2, -1)), rtol=1e-5, atol=0)
    # scaled by the old-and-new statistic, not by this step's alone: rows no longer exactly equal
    assert not torch.allclose(out2.square().mean(dim=dim), out2.square().mean(dim=dim).mean(-1, keepdim=True))


@pytest.mark.parametrize("shape", [(16, 24), (48, 24)])
def test_cautious_weight_decay_shrinks_only_where_the_update_agrees(shape):
    """p -= wd * lr * lr_eff * p exactly where the update (subtracted) has p's sign; every other
    coordinate moves as without decay, bit for bit. lr is the scheduled lr, so the decay follows
    the schedule squared; lr_eff carries the sqrt(rows/cols) of tall matrices."""
    g = torch.Generator().manual_seed(9)
    p0, grad = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    base_lr, mult, wd = 0.05, 0.5, 1.2
    out = []
    for decay in (0.0, wd):
        p = torch.nn.Parameter(p0.clone())
        opt = Muon([p], lr=base_lr, momentum=0.0, weight_decay=decay)  # momentum 0: update = NS(grad)
        opt.param_groups[0]["base_lr"] = base_lr
        set_lr((opt,), mult)
        p.grad = grad.clone()
        opt.step()
        out.append(p.detach())
    plain, decayed = out
    u = newton_schulz(grad[None], 5)[0]
    mask = (u * p0) > 0
    assert 0.3 < mask.float().mean() < 0.7
    assert torch.equal(decayed[~mask], plain[~mask])
    lr = base_lr * mult
    lr_eff = lr * max(1.0, shape[0] / shape[1]) ** 0.5
    torch.testing.assert_close(decayed[mask], plain[mask] - wd * lr * lr_eff * p0[mask], rtol=1e-6, atol=1e-7)


RECIPES = {"default": {}, "all-on": {"coeffs": "polar-express", "normuon": True, "weight_decay": 1.2}}


@pytest.mark.parametrize("recipe", RECIPES)
def test_muon_state_survives_a_checkpoint_file(recipe):
    """The state (momentum and, with NorMuon, the second moment) goes through torch.save and a
    weights_only load, as train.py's checkpoints do, and the resumed optimizer continues identically."""
    g = torch.Generator().manual_seed(10)
    shapes = [(3, 16, 24), (16, 24), (48, 24), (24, 48)]

    def make(src):
        return [torch.nn.Parameter(t.detach().clone()) for t in src]

    params = make(torch.randn(*s, generator=g) for s in shapes)
    opt = Muon(params, lr=0.02, momentum=0.9, **RECIPES[recipe])
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    clones = make(params)
    opt2 = Muon(clones, lr=0.02, momentum=0.9, **RECIPES[recipe])
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    if RECIPES[recipe].get("normuon"):
        assert opt2.state[clones[0]]["second_momentum_buffer"].shape == (3, 1, 24)   # wide: per column
        assert opt2.state[clones[2]]["second_momentum_buffer"].shape == (1, 48, 1)   # tall: per row
        assert opt2.state[clones[3]]["second_momentum_buffer"].shape == (1, 1, 48)   # wide: per column
    for _ in range(2):
        for p, c in zip(params, clones):
            p.grad = torch.randn(p.shape, generator=g)
            c.grad = p.grad.clone()
        opt.step()
        opt2.step()
    for p, c in zip(params, clones):
        assert torch.equal(p.detach(), c.detach())


@pytest.mark.parametrize(("key", "value"), [("muon_coeffs", "polar"), ("muon_normuon", "yes"),
                                            ("muon_weight_decay", -0.1)])
def test_recipe_params_are_validated(key, value):
    with pytest.raises(ParamError) as e:
        parse_section({"train": {key: value}}, "train", TrainParams)
    assert f"train.{key}" in str(e.value) and "\n" not in str(e.value)


def test_recipe_keys_enter_the_fingerprint_only_off_their_legacy_value():
    """With the behaviour runs had before the keys existed, the fingerprint is the one a checkpoint
    from then carries (it still resumes: same trajectory); any other value changes it, including
    today's defaults, so an old checkpoint never resumes under a different optimizer."""
    manifest = {"train": [{"file": "train_000000.bin", "sha256": "ab"}]}
    legacy = train_mod.effective(TrainParams(profile="cpu-tiny", **train_mod.LATER_RECIPE_KEYS))
    before = {k: v for k, v in dataclasses.asdict(legacy).items()
              if k not in train_mod.RUN_CONTROL_KEYS | set(train_mod.LATER_RECIPE_KEYS)}
    old = hashlib.sha256(json.dumps([before, ["ab"]], sort_keys=True).encode()).hexdigest()[:16]
    assert train_mod.fingerprint(legacy, manifest) == old
    for key, value in [("muon_coeffs", "polar-express"), ("muon_normuon", True), ("muon_weight_decay", 0.1),
                       ("attn_gate", True), ("bigram_vocab", 1000), ("batch_stages", [0.5, 1.0]),
                       ("batch_stage_lr", [1.0, 1.5]), ("mtp_weights", [0.5])]:
        assert train_mod.fingerprint(dataclasses.replace(legacy, **{key: value}), manifest) != old, key
    assert train_mod.fingerprint(train_mod.effective(TrainParams(profile="cpu-tiny")), manifest) != old


def test_cpu_tiny_trains_with_every_recipe_switch_on(tmp_path):
    """4 steps (~1 s each on CPU, nearly all of it the model): finite, falling loss; the NorMuon
    second moment is in the checkpoint the run writes."""
    from test_recipe import train_cpu_tiny

    steps = 4
    run, m, losses = train_cpu_tiny(tmp_path, steps, val_every=0, muon_coeffs="polar-express",
                                    muon_normuon=True, muon_weight_decay=1.2)
    paths = run.paths
    assert (run.muon.coeffs, run.muon.normuon, run.muon.weight_decay) == ("polar-express", True, 1.2)
    print("train losses", losses, "val", m["final_val_loss"])
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[-2] < losses[0] - 0.5
    assert math.isfinite(m["final_val_loss"]) and m["final_val_loss"] < losses[0]
    state = torch.load(paths.latest, map_location="cpu", weights_only=True)["muon"]["state"]
    assert state and all("second_momentum_buffer" in s for s in state.values())
