"""Run inside a venv with circuit-tracer 0.5.0 (benchmarks/make_circuit_tracer_venv.sh), by
tests/test_circuit_tracer.py.  Uses only circuit-tracer's own code:

    python circuit_tracer_reference.py MODEL_FOLDER OUT_FOLDER KIND SEED IDS LOGIT_IDS

1. writes random per-layer transcoders (KIND: relu, jumprelu or jumprelu-skip) with its classes `SingleLayerTranscoder` and
   `TranscoderSet.to_safetensors` into OUT_FOLDER/transcoders (plus the config.yaml its loader reads);
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


def make_transcoders(d_model: int, n_layers: int, kind: str, seed: int, folder: Path):
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
    tset = TranscoderSet(tcs, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out")
    tset.to_safetensors(str(folder))
    (folder / "config.yaml").write_text("model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\n"
                                        "feature_output_hook: mlp.hook_out\n")
    return tset


def main(model_folder: str, out: str, kind: str, seed: str, ids: str, logit_ids: str) -> None:
    from transformers import AutoConfig

    from circuit_tracer import ReplacementModel, attribute

    out_dir = Path(out)
    conf = AutoConfig.from_pretrained(model_folder)
    tset = make_transcoders(conf.hidden_size, conf.num_hidden_layers, kind, int(seed), out_dir / "transcoders")
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
