"""The three bundled models: names, HF configs, and where their files live (`replacement.bundle`).

Each preset is a standard HF architecture, so the bundled folders load with ``from_pretrained``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..bundle import preset_folder

CONTEXT = 128


@dataclass(frozen=True)
class Preset:
    name: str
    architecture: str  # "llama" or "gpt_neox"
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    description: str
    rope_theta: float = 10000.0

    @property
    def folder(self) -> Path:
        return preset_folder(self.name)

    def hf_config(self, vocab_size: int, bos_token_id: int, eos_token_id: int):
        if self.architecture == "llama":
            from transformers import LlamaConfig

            return LlamaConfig(
                vocab_size=vocab_size,
                hidden_size=self.d_model,
                intermediate_size=self.d_mlp,
                num_hidden_layers=self.n_layers,
                num_attention_heads=self.n_heads,
                num_key_value_heads=self.n_kv_heads,
                max_position_embeddings=CONTEXT,
                rope_theta=self.rope_theta,
                rms_norm_eps=1e-5,
                tie_word_embeddings=True,
                bos_token_id=bos_token_id,
                eos_token_id=eos_token_id,
            )
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=self.d_model,
            intermediate_size=self.d_mlp,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            max_position_embeddings=CONTEXT,
            # 16 rotary dims per head, as in Pythia-160M (64 x 0.25); tied embeddings, which made repeated-span
            # copying (induction) form much sooner than untied ones in small trial runs
            rotary_pct=0.5,
            use_parallel_residual=True,
            tie_word_embeddings=True,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # toy: Llama-3's rope_theta (500,000) leaves about half of each head's dims nearly position-free over the
        # 128-token context, which content matching (induction) needs; with it and gaps between repeated spans
        # (recipe.RECIPE_MIXTURE) induction formed, while the default 10,000 and contiguous copies gave heads that
        # look a fixed distance back instead
        Preset("toy", "llama", 2, 256, 8, 8, 704, "2-layer Llama-style transformer (the paper's small model)", 500000.0),
        Preset("pythia", "gpt_neox", 4, 256, 8, 8, 1024, "4-layer GPT-NeoX (Pythia architecture: parallel residual, partial rotary)"),
        # llama: the same rope_theta; with 10,000 it formed induction only late (after 3,200 steps) and never learned
        # to copy natural text in its later stages (recipe.py)
        Preset("llama", "llama", 4, 256, 8, 4, 704, "4-layer Llama (RMSNorm, RoPE, GQA 8q/4kv, SwiGLU), text + arithmetic",
               500000.0),
    )
}
