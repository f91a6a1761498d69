"""Run inside a venv with circuit-tracer 0.5.0 (benchmarks/make_circuit_tracer_venv.sh), by
tests/test_circuit_tracer.py.  Uses only circuit-tracer's own code:

    python circuit_tracer_reference.py MODEL_FOLDER OUT_FOLDER KIND SEED IDS LOGIT_IDS

1. writes random per-layer transcoders (KIND: relu, jumprelu or jumprelu-skip) with its classes `SingleLayerTranscoder` and
   `TranscoderSet.to_safetensors`, or (KIND: clt-jumprelu or clt-relu) a cross-layer transcoder with its class
   `CrossLayerTranscoder` and its `to_safetensors` (KIND clt-jumprelu-resid: reading hook_resid_mid, the residual
   stream before the MLP's norm), into OUT_FOLDER/transcoders (plus the config.yaml its loader reads);
2. traces the token ids IDS (comma-separated, starting with BOS) with `ReplacementModel.from_pretrained_and_transcoders`
   (nnsight backend, float32, CPU) and `attribute`, the logit targets being LOGIT_IDS (or, given
   "auto", its own choice: at most 10, to 95% probability);
3. saves the graph (active_features, activation_values, adjacency_matrix, logit token ids) as
   OUT_FOLDER/graph.safetensors.
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


# where circuit-tracer's transcoders read and write, per architecture (its nnsight hook names): the MLP's
# normalised input and its output (Gemma-2: after the MLP's own post-norm)
HOOKS = {"llama": ("mlp.hook_in", "mlp.hook_out"), "qwen3": ("mlp.hook_in", "mlp.hook_out"),
         "gemma2": ("ln2.hook_normalized", "hook_mlp_out")}


def make_transcoders(d_model: int, n_layers: int, kind: str, seed: int, folder: Path, hooks: tuple[str, str]):
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet

    g = torch.Generator().manual_seed(seed)
    n_features = 4 * d_model
    tcs = {}
    for L in range(n_layers):
        jump = kind.startswith("jumprelu")
        act = JumpReLU(torch.rand(n_features, generator=g) * 0.3, 0.1) if jump else torch.nn.ReLU()
        tc = SingleLayerTranscoder(d_model, n_features, act, L, skip_connection=kind.endswith("-skip"),
                                   device=torch.device("cpu"), dtype=torch.float32)
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(n_features, d_model, generator=g) * 0.4)
            tc.W_dec.copy_(torch.randn(n_features, d_model, generator=g) * 0.05)
            tc.b_enc.copy_(torch.randn(n_features, generator=g) * 0.1 - 0.2)
            tc.b_dec.copy_(torch.randn(d_model, generator=g) * 0.02)
            if tc.W_skip is not None:
                tc.W_skip.copy_(torch.randn(d_model, d_model, generator=g) * 0.05)
        tcs[L] = tc
    tset = TranscoderSet(tcs, feature_input_hook=hooks[0], feature_output_hook=hooks[1])
    tset.to_safetensors(str(folder))
    (folder / "config.yaml").write_text(f"model_kind: transcoder_set\nfeature_input_hook: {hooks[0]}\n"
                                        f"feature_output_hook: {hooks[1]}\n")
    return tset


def make_clt(d_model: int, n_layers: int, kind: str, seed: int, folder: Path, hooks: tuple[str, str]):
    """A random cross-layer transcoder built and saved by circuit-tracer's own CrossLayerTranscoder: every layer's
    features read that layer's MLP input and write into its own and every later MLP output."""
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    g = torch.Generator().manual_seed(seed)
    n_features = 3 * d_model
    jump = kind.startswith("clt-jumprelu")
    enc = 0.4 if hooks[0] != "hook_resid_mid" else 8.0  # the residual stream's entries are ~20x smaller
    clt = CrossLayerTranscoder(n_layers, n_features, d_model, activation_function="jump_relu" if jump else "relu",
                               lazy_decoder=False, feature_input_hook=hooks[0], feature_output_hook=hooks[1],
                               device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(n_layers, n_features, d_model, generator=g) * enc)
        clt.b_enc.copy_(torch.randn(n_layers, n_features, generator=g) * 0.1 - 0.2)
        clt.b_dec.copy_(torch.randn(n_layers, d_model, generator=g) * 0.02)
        for i in range(n_layers):
            clt.W_dec[i].copy_(torch.randn(n_features, n_layers - i, d_model, generator=g) * 0.04)
        if jump:
            clt.activation_function.threshold.copy_(torch.rand(n_layers, 1, n_features, generator=g) * 0.3)
    clt.to_safetensors(str(folder))
    (folder / "config.yaml").write_text(f"model_kind: cross_layer_transcoder\nfeature_input_hook: {hooks[0]}\n"
                                        f"feature_output_hook: {hooks[1]}\n")
    return clt


def main(model_folder: str, out: str, kind: str, seed: str, ids: str, logit_ids: str) -> None:
    from transformers import AutoConfig

    from circuit_tracer import ReplacementModel, attribute

    out_dir = Path(out)
    conf = AutoConfig.from_pretrained(model_folder)
    make = make_clt if kind.startswith("clt-") else make_transcoders
    hooks = ("hook_resid_mid", HOOKS[conf.model_type][1]) if kind.endswith("-resid") else HOOKS[conf.model_type]
    tset = make(conf.hidden_size, conf.num_hidden_layers, kind, int(seed), out_dir / "transcoders", hooks)
    model = ReplacementModel.from_pretrained_and_transcoders(model_folder, tset, backend="nnsight",
                                                             device=torch.device("cpu"), dtype=torch.float32)
    tokens = torch.tensor([int(t) for t in ids.split(",")])
    targets = None if logit_ids == "auto" else torch.tensor([int(t) for t in logit_ids.split(",")])
    graph = attribute(tokens, model, attribution_targets=targets, batch_size=64)
    save_file({"active_features": graph.active_features.cpu().long().contiguous(),
               "activation_values": graph.activation_values.cpu().float().contiguous(),
               "adjacency_matrix": graph.adjacency_matrix.cpu().float().contiguous(),
               "input_tokens": graph.input_tokens.cpu().long().contiguous(),
               "logit_token_ids": graph.logit_token_ids.cpu().long().contiguous()},
              str(out_dir / "graph.safetensors"))


if __name__ == "__main__":
    main(*sys.argv[1:])
