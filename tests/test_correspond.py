"""Lorsa-to-original-head correspondence: the streamed moments give the same R^2 as a least-squares fit on
the explicit data, and a Lorsa head built to read one original head's value channel matches it exactly."""
from __future__ import annotations

import pytest
import torch

from replacement import correspond as cs
from replacement.activations import RandomTokenSource
from replacement.hooks import hook_name
from replacement.lorsa import one_head_lorsa
from replacement.models import ModelAdapter
from tests.conftest import random_replacements, tiny_llama, tiny_neox

CFG = cs.CorrespondConfig(n_seqs=6, seq_len=12, batch_size=3, top=4)


def _r2_lstsq(y: torch.Tensor, X: torch.Tensor) -> float:
    """R^2 of the least-squares fit of y [T] on X [T, k] with an intercept (float64, explicit)."""
    A = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    coef = torch.linalg.lstsq(A, y[:, None], driver="gelsd").solution
    res = y - (A @ coef)[:, 0]
    return 1 - float((res.var(unbiased=False) / y.var(unbiased=False)).detach())


def test_subset_r2_is_the_least_squares_r2():
    torch.manual_seed(0)
    T, H, M = 500, 3, 4
    P = torch.randn(T, H, M, dtype=torch.float64)
    P[:, :, 3] = P[:, :, 0] - P[:, :, 1]  # collinear: adds nothing to a set holding both
    y = torch.einsum("thm,m->th", P, torch.tensor([1.0, -0.5, 0.0, 0.0], dtype=torch.float64)) + 0.7 * torch.randn(T, H, dtype=torch.float64)
    Pc, yc = P - P.mean(0), y - y.mean(0)
    cov_ap = torch.einsum("th,thm->hm", yc, Pc) / T
    cov_pp = torch.einsum("thm,thn->hmn", Pc, Pc) / T
    var_a = (yc ** 2).mean(0)
    subsets = [[0, 1], [0, 3], [1, 2], [2, 3]]
    got = cs.subset_r2(cov_ap, cov_pp, var_a, torch.tensor(subsets))
    for h in range(H):
        for i, s in enumerate(subsets):
            assert float(got[h, i]) == pytest.approx(_r2_lstsq(y[:, h], P[:, h, s]), abs=1e-9)
    three = cs.subset_r2(cov_ap, cov_pp, var_a, torch.tensor([[0, 1, 3]]))  # collinear: the pseudo-inverse
    for h in range(H):
        assert float(three[h, 0]) == pytest.approx(_r2_lstsq(y[:, h], P[:, h, :2]), abs=1e-6)


def test_pattern_overlap_brute_force():
    torch.manual_seed(1)
    n = 6
    mask = torch.ones(n, n).tril().bool()
    A = torch.randn(2, 3, n, n).masked_fill(~mask, -1e9).softmax(-1)
    B = torch.randn(2, 4, n, n).masked_fill(~mask, -1e9).softmax(-1)
    got = cs.pattern_overlap(A, B)
    for p in range(3):
        for q in range(4):
            want = sum(float(torch.minimum(A[b, p, t], B[b, q, t]).sum()) for b in range(2) for t in range(1, n))
            assert float(got[p, q]) == pytest.approx(want, rel=1e-5)
    assert torch.allclose(cs.pattern_overlap(A, A).diagonal(), torch.full((3,), 2.0 * (n - 1)))


def test_classify_rule():
    assert cs.classify(0.9, 0.95, fired=0, share=0.5) == "dead"
    assert cs.classify(0.5, 0.9, fired=3, share=0.5) == "one"
    assert cs.classify(0.3, 0.6, fired=3, share=0.5) == "few"
    assert cs.classify(0.3, 0.4, fired=3, share=0.5) == "spread"


@pytest.mark.parametrize("make", [tiny_llama, tiny_neox], ids=["llama_gqa", "neox_biases"])
def test_moments_equal_the_explicit_fit(make):
    """Every head's single-head, few-head and all-head R^2 from the streamed moments equals the least-squares
    R^2 on the materialised data (z of the head, original outputs projected on its output direction)."""
    adapter = ModelAdapter(make(), name="m")
    model = random_replacements(adapter, heads_per_group=4, lorsa_k=3)
    source = RandomTokenSource(97, CFG.seq_len, seed=5)
    res = cs.correspond(model, 1, CFG, source)
    lorsa = model.lorsas[1]
    zs, os, fired = [], [], torch.zeros(lorsa.cfg.n_heads, dtype=torch.long)
    for b in range(2):
        ids = source.batch(20_000 + b, 3)
        cache = adapter.run(ids, capture=cs.layer_points(1)).cache
        x = cache[hook_name(1, "attn.in")]
        zs.append(lorsa.head_activations(x)[:, 1:].flatten(0, 1).detach())
        Wo, _ = adapter.W_O(1)
        os.append(torch.einsum("bnme,med->bnmd", cache[hook_name(1, "attn.z")], Wo)[:, 1:].flatten(0, 1))
        code = lorsa.encode(x)
        fired += torch.bincount(code.indices[:, 1:][code.values[:, 1:] > 0], minlength=len(fired))
    z, o = torch.cat(zs).double(), torch.cat(os).double()
    u = lorsa.W_O.detach().double()
    u = u / u.norm(dim=-1, keepdim=True)
    M = adapter.n_heads
    assert res.tokens == len(z)
    for m in res.heads:
        P = torch.einsum("tmd,d->tm", o, u[m.head])  # [T, M]
        singles = [_r2_lstsq(z[:, m.head], P[:, [k]]) for k in range(M)]
        assert m.heads == sorted(range(M), key=lambda k: -singles[k])[: CFG.top]
        assert m.r2 == pytest.approx([singles[k] for k in m.heads], abs=2e-4)
        assert m.all_r2 == pytest.approx(_r2_lstsq(z[:, m.head], P), abs=2e-4)
        assert m.few_r2 == pytest.approx(_r2_lstsq(z[:, m.head], P[:, m.few_heads]), abs=2e-4)
        assert len(m.few_heads) <= CFG.few and m.few_r2 >= m.r2[0] - 1e-6 and m.all_r2 >= m.few_r2 - 1e-4
        assert m.fired == int(fired[m.head])
    assert sorted(res.counts()) == sorted(cs.KINDS) and sum(res.counts().values()) == lorsa.cfg.n_heads


@pytest.mark.parametrize("make", [tiny_llama, tiny_neox], ids=["llama_gqa", "neox_biases"])
def test_a_head_reading_one_original_value_channel_matches_that_head(make):
    """Head 2i of `one_head_lorsa` computes channel i of original head m's mixed values with m's own pattern.
    Give it an output direction orthogonal to m's other W_O rows: m's projected output is then proportional
    to its z, so m explains all of its variance (R^2 = 1, kind "one"), and its pattern overlaps m's fully."""
    adapter = ModelAdapter(make(), name="m")
    model = random_replacements(adapter)
    m_head, i = 2, 1
    lorsa = one_head_lorsa(adapter, 1, m_head)
    Wo, _ = adapter.W_O(1)
    others = torch.cat([Wo[m_head, :i], Wo[m_head, i + 1 :]]).float()  # [dh-1, d]
    Qb, _ = torch.linalg.qr(others.t())
    u = Wo[m_head, i].float() - Qb @ (Qb.t() @ Wo[m_head, i].float())
    with torch.no_grad():
        lorsa.W_O[2 * i] = u
    model.lorsas[1] = lorsa
    res = cs.correspond(model, 1, CFG, RandomTokenSource(97, CFG.seq_len, seed=2))
    h = res.heads[2 * i]
    assert h.heads[0] == m_head and h.r2[0] == pytest.approx(1.0, abs=1e-4)
    assert h.kind == ("one" if h.fired else "dead")
    assert h.pattern_head == m_head and h.pattern_overlap == pytest.approx(1.0, abs=1e-4)
    assert res.original_overlap[m_head][m_head] == pytest.approx(1.0, abs=1e-5)
    g = 2 * i // lorsa.cfg.heads_per_group  # correspond.json keeps each QK group's overlaps with every original head
    assert res.to_json()["group_overlap"][g][m_head] == pytest.approx(h.pattern_overlap, abs=1e-5)


def test_bad_layer_is_one_line():
    from replacement.errors import BadInputError

    model = random_replacements(ModelAdapter(tiny_llama(), name="m"))
    with pytest.raises(BadInputError, match="no Lorsa for layer 7"):
        cs.correspond(model, 7, CFG, RandomTokenSource(97, 8))


def test_a_seq_len_past_the_context_is_recorded_as_read():
    """`--seq-len 500` on a model of context 64 reads 64-token windows; correspond.json recorded 500."""
    from dataclasses import replace

    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter, heads_per_group=4, lorsa_k=3)
    cfg = replace(CFG, seq_len=500, n_seqs=1, batch_size=1)
    res = cs.correspond(model, 1, cfg, RandomTokenSource(97, adapter.context, seed=5))
    assert res.to_json()["config"]["seq_len"] == adapter.context == res.tokens + 1


def test_the_command_needs_no_transcoders(saved_model, tmp_path):
    """`circuits correspond` reads the Lorsa alone: a set of Lorsa without transcoders (trained with --what lorsa)
    was refused for its missing transcoders."""
    import os
    import subprocess
    import sys

    from replacement.models import load_model, model_fingerprint
    from replacement.store import load_replacements, save_module

    adapter = load_model(str(saved_model))
    mods = load_replacements(saved_model / "replacements", adapter)
    for (kind, L), m in mods.items():
        if kind == "lorsa":
            save_module(m, "lorsa", tmp_path / "lorsa_only", model_fingerprint(adapter), adapter.name,
                        dtype=torch.float32)
    r = subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", "correspond", "--model",
                        str(saved_model), "--layer", "0", "--n-seqs", "4", "--replacements", str(tmp_path / "lorsa_only"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "CIRCUITS_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert "layer 0:" in r.stdout and (tmp_path / "out").exists()
    # a set of transcoders alone: one line, not a silent nothing
    for (kind, L), m in mods.items():
        if kind == "transcoder":
            save_module(m, "transcoder", tmp_path / "tc_only", model_fingerprint(adapter), adapter.name,
                        dtype=torch.float32)
    r = subprocess.run([sys.executable, "-c", "from cli.main import circuits; circuits()", "correspond", "--model",
                        str(saved_model), "--layer", "0", "--replacements", str(tmp_path / "tc_only")],
                       capture_output=True, text=True,
                       timeout=600, env={**os.environ, "CIRCUITS_CACHE": str(tmp_path / "cache")})
    assert r.returncode != 0 and "hold no Lorsa" in r.stderr, (r.stdout, r.stderr)
