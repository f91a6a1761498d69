"""The frozen linear structure of one recorded prompt: with the norm scales, the attention patterns and the
errors frozen at their recorded values, what every node writes reaches every later read through linear maps.

Write slots: slot 0 holds the embedding; attention of layer L writes slot 2L+1 and its MLP slot 2L+2.
Attention L reads slot 2L; the MLP of a sequential block reads slot 2L+1, of a parallel block slot 2L; the
logits read slot 2N.  `Linearised` gives each target's read gradient R at its read slot, carries gradients
down through the frozen attention (frozen-attention mode) and the transcoders' skip connections to every
slot, and gives the constant vectors (biases) each slot holds.  graphs/attribution.py turns these into
edges, graphs/qk.py into QK pair tables.  (P centres a vector for a LayerNorm and is the identity for an
RMSNorm: replacement/norms.py.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from replacement.assemble import Record, ReplacementModel
from replacement.hooks import hook_name
from replacement.norms import centre, is_layernorm, norm_bias, norm_weight


def attn_read_slot(L: int) -> int:
    """The slot attention of layer L reads (everything written before it)."""
    return 2 * L


def attn_slot(L: int) -> int:
    """The slot attention of layer L writes: its Lorsa heads and attention error."""
    return 2 * L + 1


def mlp_slot(L: int) -> int:
    """The slot the MLP of layer L writes: its transcoder features (and skip) and MLP error."""
    return 2 * L + 2


def mlp_layer(slot: int) -> int | None:
    """The layer whose MLP writes ``slot``; None for the embedding's and the attention slots."""
    return (slot - 2) // 2 if slot >= 2 and slot % 2 == 0 else None


@dataclass
class Source:
    slot: int
    pos: int
    vector: torch.Tensor  # [d] what the node writes into the residual stream at ``slot``
    later: tuple = ()  # ((slot, [d]), ...): a cross-layer transcoder feature's writes into later MLP outputs

    def writes(self) -> list[tuple[int, torch.Tensor]]:
        """Every (slot, vector [d]) the node writes, its own slot first."""
        return [(self.slot, self.vector), *self.later]


class Linearised:
    """The frozen linear structure of one recorded prompt (read vectors, slot biases, attention VJPs)."""

    def __init__(self, model: ReplacementModel, rec: Record):
        self.model, self.rec, self.adapter = model, rec, model.adapter
        a = self.adapter
        self.N, self.n, self.d = a.n_layers, rec.ids.shape[0], a.d_model
        self.layernorm = is_layernorm(a.final_norm)
        self.final_slot = attn_read_slot(self.N)  # the logits read what the last MLP wrote
        self.device = rec.embed.device  # every tensor built here lives with the record
        self.folded: dict = {}  # {(slot, pos): [d]} writes of nodes folded into constants (bos="zero")
        self._attn_cache: dict = {}  # layer -> its frozen attention's weights for attn_vjp

    def p(self, v: torch.Tensor) -> torch.Tensor:
        """P: centre the last dim for LayerNorm, identity for RMSNorm (replacement/norms.py)."""
        return centre(v, self.layernorm)

    def mlp_read_slot(self, L: int) -> int:
        """The slot the MLP of layer L reads: attention L's output in a sequential block, not in a parallel one."""
        return attn_read_slot(L) if self.adapter.parallel_residual else attn_slot(L)

    # -- read gradients and intrinsic constants ------------------------------------------------------------

    def read_transcoder(self, L: int, feats: torch.Tensor, pos: torch.Tensor):
        """R [B, n, d] and intrinsic constants [B] for transcoder features (feats, pos: [B]); an encoder that
        reads the residual stream itself (resid_mid) has R[t] = W_enc[f], with no norm in between; one that reads
        the norm's output before its gain (mlp.normalized) R[t] = P(W_enc[f]) / sigma2[t]."""
        tc = self.model.transcoders[L]
        norm = self.adapter.mlp_norm(L)
        W = tc.W_enc[feats].float()  # [B, d]
        R = torch.zeros(len(feats), self.n, self.d, device=self.device)
        if tc.cfg.reads == "resid_mid":
            R[torch.arange(len(feats)), pos] = W
            return R, tc.b_enc[feats].float()
        if tc.cfg.reads == "mlp.normalized":  # the norm's output before its gain and bias: P(x) / sigma2
            R[torch.arange(len(feats)), pos] = self.p(W) / self.rec.layers[L].ln2_scale[pos]
            return R, tc.b_enc[feats].float()
        sig = self.rec.layers[L].ln2_scale[pos]  # [B, 1]
        R[torch.arange(len(feats)), pos] = self.p(W * norm_weight(norm)) / sig
        const = tc.b_enc[feats].float()
        if norm_bias(norm) is not None:
            const = const + W @ norm_bias(norm)
        return R, const

    def read_lorsa(self, L: int, heads: torch.Tensor, pos: torch.Tensor):
        """R [B, n, d] and intrinsic constants [B] for Lorsa heads (heads, pos: [B]): row t of the head's frozen
        pattern spreads its value read over the key positions, R[s] = A[t, s] P(w_ln * w_v) / sigma1[s] (the OV
        edge); the constant is the value bias (and what the norm's bias adds) summed over the pattern."""
        lorsa = self.model.lorsas[L]
        norm = self.adapter.attn_norm(L)
        lr = self.rec.layers[L]
        groups = heads // lorsa.cfg.heads_per_group
        A = lr.lorsa_pattern[groups, pos]  # [B, n] row t of each head's group pattern
        wv = lorsa.W_V[heads].float()  # [B, d]
        read = self.p(wv * norm_weight(norm))  # [B, d]
        R = A[:, :, None] * read[:, None, :] / lr.ln1_scale[None, :, :]  # [B, n, d]
        per_pos = lorsa.b_V[heads].float()
        if norm_bias(norm) is not None:
            per_pos = per_pos + wv @ norm_bias(norm)
        return R, A.sum(-1) * per_pos

    def read_logits(self, token_ids: torch.Tensor):
        """R [B, n, d] and constants [B] for the demeaned logits of token_ids [B] at the last position: the
        unembedding row minus its mean over the vocabulary, through the final norm at its frozen scale."""
        a = self.adapter
        W_U = a.unembedding.weight.detach().float()
        Wd = W_U[token_ids] - W_U.mean(0)  # [B, d] demeaned
        R = torch.zeros(len(token_ids), self.n, self.d, device=self.device)
        T = self.n - 1
        R[:, T] = self.p(Wd * norm_weight(a.final_norm)) / self.rec.final_scale[T]
        const = torch.zeros(len(token_ids), device=self.device)
        if norm_bias(a.final_norm) is not None:
            const = const + Wd @ norm_bias(a.final_norm)
        b_U = getattr(a.unembedding, "bias", None)
        if b_U is not None:
            b = b_U.detach().float()
            const = const + b[token_ids] - b.mean()
        return R, const

    # -- what each slot's writes contain besides nodes -------------------------------------------------

    def slot_bias(self, slot: int) -> torch.Tensor | None:
        """The constant vector [d] written at every position at a slot (biases), or None."""
        if slot == 0:
            return None
        L, is_mlp = (slot - 1) // 2, slot % 2 == 0  # slot is attn_slot(L) or mlp_slot(L)
        if is_mlp:
            tc = self.model.transcoders[L]
            b = tc.b_dec.detach().float()
            b_ln = norm_bias(self.adapter.mlp_norm(L))
            if tc.W_skip is not None and b_ln is not None:
                b = b + tc.skip(b_ln)  # the skip of the norm's own bias
            return b
        if self.model.attention == "lorsa":
            return self.model.lorsas[L].b_O.detach().float()
        a = self.adapter
        (Wv, bv), (Wo, bo) = a.W_V(L), a.W_O(L)
        v_const = torch.zeros(a.n_heads, a.d_head, device=self.device) if bv is None else bv.float()
        if norm_bias(a.attn_norm(L)) is not None:
            v_const = v_const + torch.einsum("d,hde->he", norm_bias(a.attn_norm(L)), Wv.float())
        out = torch.einsum("he,hed->d", v_const, Wo.float())
        return out if bo is None else out + bo.float()

    def attn_vjp(self, L: int, g_out: torch.Tensor) -> torch.Tensor:
        """Frozen MHSA of layer L as a linear map slot 2L -> 2L+1; returns the gradient at its input [B, n, d].
        Three products: through W_O to every query head, through the pattern, and (query heads of one GQA
        group summed first) through each key/value head's W_V once."""
        a = self.adapter
        post = a.post_norm(L, "attn")
        if post is not None:  # Gemma-2: the output's own norm, its scale frozen
            g_out = g_out * norm_weight(post) / self.rec.cache[hook_name(L, "ln1_post.scale")][None]
        Wo, Wv = self._attn_maps(L)  # [d, H*dh], [KV*dh, d]
        A = self.rec.layers[L].pattern  # [H, n, n]
        H, n, B = A.shape[0], self.n, g_out.shape[0]
        KV = Wv.shape[0] // (Wo.shape[1] // H)
        g_z = (g_out @ Wo).view(B, n, H, -1).transpose(1, 2)  # [B, H, t, dh]
        g_v = A.transpose(1, 2) @ g_z  # [B, H, s, dh]
        g_v = g_v.view(B, KV, H // KV, n, -1).sum(2)  # [B, KV, s, dh]: a GQA group's query heads read one W_V
        g_x = g_v.transpose(1, 2).reshape(B, n, -1) @ Wv  # [B, s, d]
        return self.p(g_x * norm_weight(a.attn_norm(L))) / self.rec.layers[L].ln1_scale[None]

    def _attn_maps(self, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer L's W_O as [d, H*dh] and its key/value heads' W_V as [KV*dh, d], in float32, made once."""
        if L not in self._attn_cache:
            a = self.adapter
            (Wv, _), (Wo, _) = a.W_V(L), a.W_O(L)  # [H, d, dh] per query head, [H, dh, d]
            rep = a.n_heads // a.n_kv_heads  # GQA (1 without it)
            Wv = Wv[::rep].float()  # [KV, d, dh]: query head h reads key/value head h // rep
            self._attn_cache[L] = (Wo.reshape(-1, self.d).t().float().contiguous(),
                                   Wv.transpose(1, 2).reshape(-1, self.d).contiguous())
        return self._attn_cache[L]

    # -- transcoder skip connections: linear maps from slot mlp_read_slot(L) to slot mlp_slot(L) ---------------

    def skip_layers(self, read_slot: int) -> list[int]:
        """The layers whose MLP has a skip connection that writes at or below ``read_slot``, in order."""
        return [L for L in range(self.N) if self.model.transcoders[L].W_skip is not None and mlp_slot(L) <= read_slot]

    def skip_map(self, L: int, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """The skip's linear part on residual vectors x [.., n, d] (or [R, d] at positions ``pos`` [R]):
        (w_ln2 * P(x)) / sigma2 @ W_skip (the norm's bias is a constant: see slot_bias)."""
        sig = self.rec.layers[L].ln2_scale  # [n, 1]
        sig = sig if pos is None else sig[pos]
        return self.model.transcoders[L].skip(self.p(x) * norm_weight(self.adapter.mlp_norm(L)) / sig)

    def skip_vjp(self, L: int, g_out: torch.Tensor) -> torch.Tensor:
        """The transpose of skip_map: gradient [B, n, d] at the skip's output -> at its input."""
        W = self.model.transcoders[L].W_skip.float()
        return self.p((g_out @ W.t()) * norm_weight(self.adapter.mlp_norm(L))) / self.rec.layers[L].ln2_scale[None]

    def through_skips(self, vectors: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor,
                      read_slot: int) -> torch.Tensor:
        """What writes ``vectors`` [R, d] (at ``slots``, ``pos`` [R]) add to the stream read at ``read_slot``:
        the write itself plus what every skip connection in between passes on (skips compose in order)."""
        out = vectors.clone()
        for L in self.skip_layers(read_slot):
            seen = slots <= self.mlp_read_slot(L)
            out[seen] += self.skip_map(L, out[seen], pos[seen])
        return out

    def read_constants(self, read_slot: int) -> torch.Tensor:
        """[n, d]: the constant part of the stream read at ``read_slot`` (every bias, through the skips)."""
        c = torch.zeros(self.n, self.d, device=self.device)
        skips = set(self.skip_layers(read_slot))
        at_read = {}
        for w in range(read_slot + 1):
            L = mlp_layer(w)
            if L in skips:
                c = c + self.skip_map(L, at_read[L])
            b = self.slot_bias(w)
            if b is not None:
                c = c + b
            for (fw, fp), vec in self.folded.items():
                if fw == w:
                    c = c.index_add(0, torch.tensor([fp], device=c.device), vec[None].to(c.dtype))  # not in place
            for L in skips:
                if self.mlp_read_slot(L) == w:
                    at_read[L] = c
        return c

    def slot_gradients(self, R: torch.Tensor, read_slot: int) -> list[torch.Tensor | None]:
        """G_w [B, n, d] for w = 0..read_slot (None above it)."""
        G: list[torch.Tensor | None] = [None] * (self.final_slot + 1)
        G[read_slot] = R
        skip_read = {self.mlp_read_slot(L): L for L in self.skip_layers(read_slot)}
        for w in range(read_slot - 1, -1, -1):
            g = G[w + 1]
            if self.model.attention == "frozen" and w % 2 == 0 and w + 1 <= read_slot:  # w = attn_read_slot(w // 2)
                g = g + self.attn_vjp(w // 2, G[attn_slot(w // 2)])
            if w in skip_read:
                L = skip_read[w]
                g = g + self.skip_vjp(L, G[mlp_slot(L)])
            G[w] = g
        return G
