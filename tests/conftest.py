"""Shared fixtures: tiny random HF models of each supported architecture (no download, no training)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def tiny_neox(**overrides):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True)
    kw.update(overrides)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**kw)).eval()
    with torch.no_grad():  # random LayerNorm/bias values so that every term of the maths is exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture
def llama_adapter():
    from replacement.models import ModelAdapter

    return ModelAdapter(tiny_llama())


@pytest.fixture
def neox_adapter():
    from replacement.models import ModelAdapter

    return ModelAdapter(tiny_neox())


@pytest.fixture(params=["llama", "neox"])
def adapter(request):
    from replacement.models import ModelAdapter

    return ModelAdapter(tiny_llama() if request.param == "llama" else tiny_neox())


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 97, (2, 12))


def random_replacements(adapter, n_features=32, tc_k=4, heads_per_group=4, lorsa_k=4, seed=0, attention="lorsa",
                        skip=False, d_qk=None):
    """A ReplacementModel with random (untrained) Lorsa and transcoders (with random skip connections if
    ``skip``; Lorsa QK width ``d_qk``, default the model's head dimension): the graph maths must hold anyway."""
    from dataclasses import replace

    from replacement.assemble import ReplacementModel
    from replacement.lorsa import LorsaConfig, lorsa_for_model
    from replacement.transcoder import Transcoder, TranscoderConfig

    torch.manual_seed(seed)
    modules = {}
    for L in range(adapter.n_layers):
        cfg = LorsaConfig.default_for(adapter, L, heads_per_group=heads_per_group, qk_per_head=1, top_k=lorsa_k)
        cfg = cfg if d_qk is None else replace(cfg, d_qk=d_qk)
        lorsa = lorsa_for_model(adapter, L, cfg)
        tc = Transcoder(TranscoderConfig(adapter.d_model, n_features, tc_k, layer=L, skip=skip))
        with torch.no_grad():
            if skip:
                tc.W_skip.normal_(0, 0.03 / adapter.d_model ** 0.5)  # outputs about the size of the stream
            for m in (lorsa, tc):
                for name, p in m.named_parameters():
                    if name.startswith("b_"):
                        p.normal_(0, 0.2)
        modules[("lorsa", L)] = lorsa.eval()
        modules[("transcoder", L)] = tc.eval()
    return ReplacementModel(adapter, modules, attention)


def qk_entries_with_real_scores(model, graph, ids):
    """Each Lorsa node's QK entries with the score its module computes itself: (head node, entry, real score)."""
    import math

    rec = model.record(ids)
    for head in graph.nodes(type="lorsa"):
        lorsa = model.lorsas[head.layer]
        q, k = lorsa.qk(rec.layers[head.layer].attn_in[None])
        g = head.index // lorsa.cfg.heads_per_group
        for entry in head.qk:
            yield head, entry, float(q[0, g, head.pos] @ k[0, g, entry.key_pos]) / math.sqrt(lorsa.cfg.d_qk)


def node_write(graph, model, rec, node_id: str) -> torch.Tensor:
    """[d]: what a node adds to the residual stream at its position, from the record and the modules' weights."""
    n = graph.node(node_id)
    if n.type == "embedding":
        return rec.embed[n.pos]
    if n.type == "lorsa":
        return n.activation * model.lorsas[n.layer].W_O[n.index].float()
    if n.type == "transcoder":
        return n.activation * model.transcoders[n.layer].W_dec[n.index].float()
    return (rec.layers[n.layer].attn_err if n.type == "attn_error" else rec.layers[n.layer].mlp_err)[n.pos]


@torch.no_grad()
def independent_qk(model, rec, layer: int):
    """(q, k, q_bias, k_bias) [n_qk, n, d_qk] of layer ``layer``'s Lorsa on a recorded prompt, from the module's own
    Q/K alone: q, k on what it reads; the biases on the stream's constant part, which for replacements without skip
    connections is the earlier modules' output biases (the model's own biases land in the error nodes), through the
    norm's linear part at the recorded scale."""
    lorsa, norm = model.lorsas[layer], model.adapter.attn_norm(layer)
    n, d = rec.ids.shape[0], model.adapter.d_model
    assert not any(tc.W_skip is not None for tc in model.transcoders.values())
    const = sum((model.lorsas[m].b_O + model.transcoders[m].b_dec).float() for m in range(layer)) + torch.zeros(n, d)
    x_c = attn_norm_linear(model, rec, layer, const) + (norm.bias.float() if getattr(norm, "bias", None) is not None else 0)
    (q, k), (qb, kb) = lorsa.qk(rec.layers[layer].attn_in[None]), lorsa.qk(x_c[None])
    return q[0], k[0], qb[0], kb[0]


def attn_norm_linear(model, rec, layer: int, u: torch.Tensor) -> torch.Tensor:
    """[n, d]: the linear part of layer ``layer``'s attention norm applied to ``u`` [n, d] at each position's recorded
    scale (GPT-NeoX's LayerNorm centres, Llama's RMSNorm does not; the bias is left out)."""
    norm = model.adapter.attn_norm(layer)
    centred = u - u.mean(-1, keepdim=True) if getattr(norm, "bias", None) is not None else u
    return norm.weight.float() * centred / rec.layers[layer].ln1_scale.reshape(-1, 1)


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory):
    """A tiny Llama with a tokenizer and random replacements, saved as a local model folder."""
    from replacement.lm.tokenizer import train_tokenizer
    from replacement.models import load_model, model_fingerprint
    from replacement.store import save_module

    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tok = train_tokenizer(["the cat sat on the mat. 1 + 2 = 3\n" * 50], vocab_size=2400, number_copies=2)
    model = tiny_llama(vocab_size=len(tok), bos_token_id=tok.bos_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    adapter = load_model(str(folder))
    rm = random_replacements(adapter)
    fp = model_fingerprint(adapter)
    for (kind, L), m in list({("lorsa", L): rm.lorsas[L] for L in rm.lorsas}.items()) + \
            list({("transcoder", L): rm.transcoders[L] for L in rm.transcoders}.items()):
        save_module(m, kind, folder / "replacements", fp, adapter.name, dtype=torch.float32)
    return folder


def rechecksum(folder) -> None:
    """Record in a replacements folder's config.json the CRC-32 of each module file as it now is (a test that edits
    a module file on purpose, to stand for a set saved that way)."""
    from replacement.store import file_checksum

    cfg_path = Path(folder) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for entry in cfg["modules"].values():
        entry["crc32"] = file_checksum(Path(folder) / entry["file"])
    cfg_path.write_text(json.dumps(cfg))
