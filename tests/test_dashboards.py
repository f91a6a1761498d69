"""Dashboards: top contexts, z patterns and logit lens against brute-force recomputations; the cache."""
from __future__ import annotations

import pytest
import torch

from replacement.dashboards import DashboardConfig, load_or_build, logit_lens, top_locations, window_positions
from replacement.models import ModelAdapter
from tests.conftest import random_replacements, tiny_llama, tiny_neox

CFG = DashboardConfig(n_seqs=6, seq_len=24, batch_size=3, top_contexts=4, before=5, after=2, top_logits=5)


def test_top_locations_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    N, K, F, c = 50, 3, 7, 4
    values = torch.rand(N, K, generator=g) * (torch.rand(N, K, generator=g) > 0.2)
    indices = torch.stack([torch.randperm(F, generator=g)[:K] for _ in range(N)])
    vals, tok = top_locations(values, indices, F, c)
    for f in range(F):
        hits = sorted(((float(values[t, j]), t) for t in range(N) for j in range(K)
                       if indices[t, j] == f and values[t, j] > 0), reverse=True)[:c]
        assert vals[f, : len(hits)].tolist() == pytest.approx([v for v, _ in hits])
        assert tok[f, : len(hits)].tolist() == [t for _, t in hits]
        assert (tok[f, len(hits):] == -1).all() and (vals[f, len(hits):] == 0).all()


def test_window_positions():
    w = window_positions(torch.tensor([0, 5, 9]), 10, 2, 1)
    assert w.tolist() == [[-1, -1, 0, 1], [3, 4, 5, 6], [7, 8, 9, -1]]


@pytest.mark.parametrize("make", [tiny_llama, tiny_neox])
def test_logit_lens_is_the_unembedded_direction(make):
    """Through the real final norm and unembedding: logits(norm(w)) - logits(norm(0)) = lens(w) / scale(w)."""
    a = ModelAdapter(make())
    W = torch.randn(6, a.d_model)
    ids, vals, low_ids, low = logit_lens(W, a.final_norm.weight.detach(), a.unembedding.weight.detach(),
                                         isinstance(a.final_norm, torch.nn.LayerNorm), 4)
    with torch.no_grad():
        real = a.unembedding(a.final_norm(W)) - a.unembedding(a.final_norm(torch.zeros(1, a.d_model)))
        centred = W - W.mean(-1, keepdim=True) if isinstance(a.final_norm, torch.nn.LayerNorm) else W
        eps = getattr(a.final_norm, "eps", None) or getattr(a.final_norm, "variance_epsilon")
        scale = (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    assert torch.equal(ids, real.topk(4, dim=-1).indices)
    assert torch.allclose(vals / scale, real.topk(4, dim=-1).values, atol=1e-5)
    assert torch.equal(low_ids, real.topk(4, dim=-1, largest=False).indices)
    barred = ids[:, 0].tolist() + low_ids[:, 0].tolist()  # special tokens are left out of both ends
    ids2, _, low2, _ = logit_lens(W, a.final_norm.weight.detach(), a.unembedding.weight.detach(),
                                  isinstance(a.final_norm, torch.nn.LayerNorm), 4, exclude=barred)
    real[:, barred] = torch.nan
    assert torch.equal(ids2, real.nan_to_num(-torch.inf).topk(4, dim=-1).indices)
    assert torch.equal(low2, real.nan_to_num(torch.inf).topk(4, dim=-1, largest=False).indices)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    adapter = ModelAdapter(tiny_llama(), name="m")
    model = random_replacements(adapter)
    cache = tmp_path_factory.mktemp("dash")
    return model, load_or_build(model, CFG, cache_dir=cache, progress=False), cache


def _sample(model):
    from replacement.activations import default_source

    src = default_source(model.adapter, CFG.seq_len, CFG.seed, heldout=True)
    return torch.cat([src.batch(10_000 + b, CFG.batch_size) for b in range(CFG.n_seqs // CFG.batch_size)])


def test_n_seqs_is_the_number_of_sequences_scanned(built, tmp_path):
    """--n-seqs that is not a whole number of batches scans that many sequences (the last batch was a whole one):
    each unit's density is over n_seqs x seq_len tokens of the batches drawn."""
    from dataclasses import replace

    from replacement.activations import default_source

    model, _, _ = built
    cfg = replace(CFG, n_seqs=4)  # batches of 3: 3 + 1
    dash = load_or_build(model, cfg, cache_dir=tmp_path, progress=False)
    src = default_source(model.adapter, cfg.seq_len, cfg.seed, heldout=True)
    ids = torch.cat([src.batch(10_000, 3), src.batch(10_001, 1)])
    assert ids.shape == (4, cfg.seq_len)
    with torch.no_grad():
        x = model.adapter.run(ids, capture=True).cache["blocks.0.mlp.in"]
    tc = model.transcoders[0]
    acts = tc.encode(x).dense(tc.W_dec.shape[0])
    for f in dash.ranked("transcoder", 0)[:5]:
        assert dash.entry("transcoder", 0, f)["density"] == pytest.approx(float((acts[..., f] > 0).float().mean()))


def test_contexts_match_a_direct_recomputation(built):
    model, dash, _ = built
    ids = _sample(model)
    a = model.adapter
    with torch.no_grad():
        cache = a.run(ids, capture=True).cache
    for L in range(a.n_layers):
        lorsa, tc = model.lorsas[L], model.transcoders[L]
        x = cache[f"blocks.{L}.attn.in"]
        lorsa_acts = lorsa.encode(x).dense(lorsa.cfg.n_heads)  # [S, n, H]
        tc_acts = tc.encode(cache[f"blocks.{L}.mlp.in"]).dense(tc.W_dec.shape[0])
        for kind, acts in (("lorsa", lorsa_acts), ("transcoder", tc_acts)):
            for f in dash.ranked(kind, L)[:5]:
                e = dash.entry(kind, L, f)
                col = acts[..., f]
                assert e["density"] == pytest.approx(float((col > 0).float().mean()))
                best = col.flatten().topk(len(e["contexts"])).values
                assert [c["activation"] for c in e["contexts"]] == pytest.approx(best.tolist(), rel=1e-5)
                for c in e["contexts"]:
                    s, t, q = c["seq"], c["pos"], c["query"]
                    lo = t - q
                    assert c["acts"] == pytest.approx(col[s, lo : lo + len(c["acts"])].tolist(), abs=2e-2, rel=1e-2)
                    if kind == "lorsa":  # z pattern: A[t, s] v_s, summing to the head's activation
                        z = lorsa.z_pattern(x[s : s + 1], f, t)[0]
                        assert float(z.sum()) == pytest.approx(c["activation"], rel=1e-4, abs=1e-5)
                        window = z[lo : lo + len(c["z"])]
                        window = torch.where(torch.arange(lo, lo + len(c["z"])) <= t, window, torch.zeros_like(window))
                        assert c["z"] == pytest.approx(window.tolist(), abs=2e-2, rel=1e-2)
                        strongest = z.abs().argmax()
                        assert c["z_top"][0]["pos"] == int(strongest)
                        assert c["z_top"][0]["offset"] == int(strongest) - t


def test_lorsa_dashboards_name_the_original_heads(built):
    """Each Lorsa dashboard carries its head's correspondence (replacement/correspond.py) on the same sample."""
    from replacement.activations import default_source
    from replacement.correspond import CorrespondConfig, correspond

    model, dash, _ = built
    src = default_source(model.adapter, CFG.seq_len, CFG.seed, heldout=True)

    class Same:  # the dashboards' batches, which `correspond` asks for by its own step numbers
        batch = staticmethod(lambda step, size: src.batch(step - 20_000 + 10_000, size))

    for L in model.lorsas:
        res = correspond(model, L, CorrespondConfig(n_seqs=CFG.n_seqs, seq_len=CFG.seq_len, batch_size=CFG.batch_size),
                         Same())
        for h in res.heads:
            o = dash.entry("lorsa", L, h.head)["original_heads"]
            assert o["kind"] == h.kind and [m for m, _ in o["heads"]] == h.heads
            assert [r for _, r in o["heads"]] == pytest.approx(h.r2, abs=1e-4)
            assert o["few"] == h.few_heads and o["pattern_head"] == h.pattern_head


def test_cache_is_reused_and_keyed_by_the_weights(built, monkeypatch):
    model, dash, cache = built
    import replacement.dashboards as dmod

    def no_build(*a, **k):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(dmod, "build", no_build)
    again = load_or_build(model, CFG, cache_dir=cache, progress=False)
    for L, tensors in dash.layers.items():
        assert tensors.keys() == again.layers[L].keys()
        assert all(torch.equal(tensors[k], again.layers[L][k]) for k in tensors)
    with torch.no_grad():
        model.transcoders[0].W_dec.mul_(1.5)  # new weights: a new key, so a build
    try:
        with pytest.raises(AssertionError, match="rebuilt"):
            load_or_build(model, CFG, cache_dir=cache, progress=False)
    finally:
        with torch.no_grad():
            model.transcoders[0].W_dec.div_(1.5)


def test_a_text_sample_is_keyed_by_its_contents(tmp_path):
    """Dashboards built from --text files are cached under their contents: an edited file of the same name is
    scanned anew (keyed by the name, the old text's contexts were shown); the same contents are reused."""
    from replacement.dashboards import texts_name

    a, b = tmp_path / "a" / "t.txt", tmp_path / "b" / "t.txt"
    for path, text in ((a, "fruit and apples"), (b, "ships and sails")):
        path.parent.mkdir()
        path.write_text(text)
    assert texts_name([str(a)]) != texts_name([str(b)])
    before = texts_name([str(a)])
    a.write_text("ships and sails")
    assert texts_name([str(a)]) == texts_name([str(b)]) != before
    assert texts_name([str(tmp_path / "missing.txt")]).endswith("missing.txt")  # reading it says why, later


def test_bad_index_is_one_clear_error(built):
    from replacement.errors import BadInputError

    _, dash, _ = built
    with pytest.raises(BadInputError, match="out of range"):
        dash.entry("lorsa", 0, 10**6)


def test_sample_bytes_counts_what_the_scan_keeps(built):
    """`heads` refuses an --n-seqs whose sample would not fit in memory (a huge one scanned until the kernel
    killed it); the estimate is twice the bytes of the tensors the scan keeps (the parts, then their concatenation)."""
    from replacement.activations import default_source
    from replacement.dashboards import _codes, sample_bytes

    model, _, _ = built
    ids, codes, attn_in, _ = _codes(model, CFG, default_source(model.adapter, CFG.seq_len, CFG.seed, heldout=True),
                                    CFG.seq_len, progress=False)
    kept = ids.nbytes + sum(v.nbytes + i.nbytes for parts in codes.values() for v, i in parts) \
        + sum(x.nbytes for xs in attn_in.values() for x in xs)
    assert sample_bytes(model, CFG) == 2 * kept


def test_partial_characters_read_as_their_bytes():
    """A token holding part of a multi-byte character reads as its bytes in the dashboards, not as U+FFFD."""
    from transformers import AutoTokenizer

    from replacement.bundle import preset_folder
    from replacement.dashboards import Dashboards

    tok = AutoTokenizer.from_pretrained(preset_folder("toy"))
    partial = [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]
    assert partial  # byte-level BPE: some tokens are lone bytes of a character
    dash = Dashboards({}, tok, CFG)
    texts = [dash._tok(i) for i in partial]
    assert all("\ufffd" not in t and "<0x" in t for t in texts) and len(set(texts)) == len(texts)


def test_an_empty_cache_variable_is_no_cache_variable(monkeypatch, tmp_path):
    """CIRCUITS_CACHE set to nothing means the default cache (it put ./dashboards in the working folder)."""
    from pathlib import Path

    from replacement.dashboards import default_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CIRCUITS_CACHE", " ")
    assert default_cache_dir() == tmp_path / ".cache" / "circuits" / "dashboards"
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == Path(tmp_path / "c" / "dashboards")
