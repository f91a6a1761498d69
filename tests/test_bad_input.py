"""A corpus of bad input, each case run through the real command-line entry points (`trace`, `circuits`) in a
process of its own (forked from one that has done the imports, tests/forked_cli.py): every case must exit
non-zero with exactly one line on stderr (the expected message), no traceback, no file created, and every file
already there byte-for-byte intact.

The cases share one world (a tiny saved model with random replacements, its broken variants, malformed graph
files, an earlier output folder); a snapshot of the whole world is compared before and after each case.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, rechecksum
from tests.forked_cli import CliServer


@dataclass
class Case:
    id: str
    args: list  # str or bytes; "{M}" and other {NAMES} are replaced by paths of the world
    expect: str  # must appear in the one line on stderr
    path: str | None = None  # PATH for the run: a folder of the world ("{NODOT}", "{FAILDOT}")
    fsize: int | None = None  # a file-size limit (bytes): writes beyond it fail as on a full disk
    env: dict = field(default_factory=dict)


T = ["trace", "the cat sat", "--model", "{M}", "--out", "{PREV}"]  # a good trace into an earlier output folder
CASES = [
    # prompts and options of `trace`, checked before the model loads
    Case("empty-prompt", ["trace", "", "--model", "{M}"], "the prompt is empty"),
    Case("blank-prompt", ["trace", " \n\t ", "--model", "{M}"], "the prompt is empty"),
    Case("empty-model", ["trace", "the cat", "--model", ""], "Invalid value for '--model': is empty"),
    Case("empty-device", ["trace", "the cat", "--model", "{M}", "--device", " "], "Invalid value for '--device': is empty"),
    Case("empty-replacements", T + ["--replacements", ""], "Invalid value for '--replacements': is empty"),
    Case("correspond-empty-layer", ["circuits", "correspond", "--model", "{M}", "--layer", ""],
         "Invalid value for '--layer': is empty"),  # was: every layer
    Case("train-empty-out", ["circuits", "train", "--model", "{M}", "--out", ""], "Invalid value for '--out': is empty"),
    # the empty ones below were read as their defaults: every layer, ./graph.json, $CIRCUITS_DATA, the current folder
    Case("train-empty-layers", ["circuits", "train", "--model", "{M}", "--layers", ""],
         "Invalid value for '--layers': is empty"),
    # options that set what the run leaves out were ignored without a word
    Case("no-qk-qk-heads", T + ["--no-qk", "--qk-heads", "3"], "--qk-heads sets the QK explanations, which --no-qk"),
    Case("no-qk-qk-reference", T + ["--no-qk", "--qk-reference", "runner_up"], "--qk-reference sets the QK"),
    Case("json-draw-nodes", T + ["--format", "json", "--draw-nodes", "5"], "--format json draws none"),
    Case("no-families-expand", T + ["--no-families", "--expand-families"],
         "--expand-families draws the members of families, which --no-families does not find"),
    Case("heads-top-with-head", ["circuits", "heads", "--model", "{M}", "--layer", "0", "--head", "1", "--top", "5"],
         "--top sets how many heads and features a layer's list shows"),
    Case("train-lm-workdir-file", ["circuits", "train-lm", "--model", "toy", "--workdir", "{TEXT}"],
         "is a file, not a folder"),
    Case("query-empty-graph", ["circuits", "query", ""], "Invalid value for 'graph_json': is empty"),
    Case("render-empty-graph", ["circuits", "render", " "], "Invalid value for 'graph_json': is empty"),
    Case("query-empty-compare", ["circuits", "query", "{PREV}", "--compare", ""], "Invalid value for '--compare': is empty"),
    Case("fetch-data-empty-dest", ["circuits", "fetch-data", "--dest", ""], "Invalid value for '--dest': is empty"),
    Case("fetch-data-empty-work", ["circuits", "fetch-data", "--work", " "], "Invalid value for '--work': is empty"),
    Case("train-replacements-empty-workdir", ["circuits", "train-replacements", "--model", "toy", "--workdir", ""],
         "Invalid value for '--workdir': is empty"),
    Case("train-lm-empty-workdir", ["circuits", "train-lm", "--model", "toy", "--workdir", ""],
         "Invalid value for '--workdir': is empty"),
    Case("train-empty-text", ["circuits", "train", "--model", "{M}", "--text", ""], "Invalid value for '--text': is empty"),
    Case("dash-prompt", ["trace", "-5 + 3 =", "--model", "{M}"],
         "No such option '-5'. (see --help; a prompt that starts with - goes after --: ... -- '-5 + 3 ='"),
    Case("empty-out", ["trace", "the cat sat", "--model", "{M}", "--out", ""], "--out is empty"),
    Case("invalid-utf8-prompt", ["trace", b"ab\xff\xfe", "--model", "{M}"], "PROMPT is not valid UTF-8"),
    Case("invalid-utf8-target", T + ["--target", b"\xc3"], "--target is not valid UTF-8"),
    Case("too-long-prompt", ["trace", "the cat " * 60, "--model", "{M}", "--out", "{PREV}"], "longer than the model's context"),
    Case("multi-token-target", T + ["--target", "zzqqxx yy"], "is not a single token"),
    Case("special-token-target", T + ["--target", "<|bos|>"], "--target '<|bos|>' is a special token (BOS, padding, ...)"),
    Case("node-threshold-0", T + ["--node-threshold", "0"], "--node-threshold must be in (0, 1]"),
    Case("node-threshold-1.5", T + ["--node-threshold", "1.5"], "--node-threshold must be in (0, 1]"),
    Case("node-threshold-nan", T + ["--node-threshold", "nan"], "--node-threshold must be in (0, 1]"),
    Case("edge-threshold-negative", T + ["--edge-threshold", "-1"], "--edge-threshold must be in (0, 1]"),
    Case("edge-threshold-text", T + ["--edge-threshold", "abc"], "Invalid value for '--edge-threshold'"),
    Case("max-nodes-0", T + ["--max-nodes", "0"], "--max-nodes must be at least 1"),
    Case("qk-heads-0", T + ["--qk-heads", "0"], "--qk-heads must be at least 1"),
    Case("qk-heads-negative", T + ["--qk-heads", "-3"], "--qk-heads must be at least 1"),
    Case("format-unknown", T + ["--format", "gif"], "unknown format"),
    Case("format-empty", T + ["--format", ""], "unknown format"),
    Case("format-only-commas", T + ["--format", " , "], "unknown format"),
    Case("attention-unknown", T + ["--attention", "bogus"], "Invalid value for '--attention'"),
    Case("dtype-unknown", T + ["--dtype", "float16"], "Invalid value for '--dtype'"),
    Case("unknown-option", T + ["--bogus"], "No such option"),
    Case("missing-prompt", ["trace", "--model", "{M}"], "Missing argument 'PROMPT'"),
    Case("no-dot-for-svg", T + ["--format", "json,svg"], "needs graphviz's `dot`", path="{NODOT}"),
    Case("no-dot-for-png", T + ["--format", "png"], "needs graphviz's `dot`", path="{NODOT}"),
    # models
    Case("model-unknown", ["trace", "x", "--model", "nope"], "unknown model"),
    Case("model-missing-folder", ["trace", "x", "--model", "./missing-folder"], "no such model folder"),
    Case("model-folder-without-config", ["trace", "x", "--model", "{EMPTY}"], "not an HF model folder"),
    Case("model-invalid-config-json", ["trace", "x", "--model", "{BADCONFIG}"], "cannot load"),
    Case("model-config-claims-a-trillion-layers", ["trace", "x", "--model", "{MANYLAYERS}"],
         "its config.json says 1000000000000 layers, its weights hold 2"),  # HF would build layers forever
    Case("model-config-claims-no-layers", ["trace", "x", "--model", "{NOLAYERS}"],
         "its config.json says 0 layers, its weights hold 2"),  # HF would drop the weights: another model
    Case("model-config-width-0", ["trace", "x", "--model", "{WIDTH0}"],
         "the weights' shapes differ from what its config.json describes"),  # torch's warning kept off stderr
    Case("model-config-negative-context", ["trace", "x", "--model", "{CTXNEG}"],
         "max_position_embeddings is -1, not a positive whole number"),  # "longer than the model's context of -1"
    Case("model-config-width-as-text", ["trace", "x", "--model", "{WIDTHTEXT}"],
         "Validation error for field 'hidden_size': "),  # the reason, on the validator's next line, was cut off
    Case("model-truncated-safetensors", ["trace", "x", "--model", "{TRUNCATED}"], "cannot load the weights"),
    Case("model-pickle-only", ["trace", "x", "--model", "{PICKLE}"], "only pickle weights (pytorch_model.bin)"),
    Case("model-pickle-beside-other-safetensors", ["trace", "x", "--model", "{PICKLEMIX}"],
         "only pickle weights (pytorch_model.bin), which are never loaded (and extra.safetensors"),
    Case("long-prompt-before-weights", ["trace", "the cat " * 60, "--model", "{TRUNCATED}"],
         "longer than the model's context"),  # checked with the tokenizer alone: the broken weights never load
    Case("bad-target-before-weights", ["trace", "the cat", "--model", "{TRUNCATED}", "--target", "zz qq"],
         "is not a single token"),
    Case("over-memory-budget", ["trace", "the cat sat on the mat", "--model", "{M}"], "more than the 100 KB available",
         env={"CIRCUITS_MEMORY_BUDGET": "100K"}),
    Case("memory-budget-unreadable", T, "CIRCUITS_MEMORY_BUDGET='lots' is not a size",
         env={"CIRCUITS_MEMORY_BUDGET": "lots"}),
    Case("device-unknown", T + ["--device", "tpu"], "unknown device 'tpu'"),
    Case("model-nan-weights", ["trace", "the cat", "--model", "{NANMODEL}"], "NaN or infinite logits"),
    # replacements
    Case("replacements-missing", T + ["--replacements", "{WORLD}/no-such-folder"], "no-such-folder does not exist)"),
    Case("eval-replacements-missing", ["circuits", "eval", "--model", "{M}", "--no-samples", "--replacements", "{WORLD}/no-such-folder"],
         "no-such-folder does not exist)"),
    Case("replacements-empty-folder", T + ["--replacements", "{G}"], "no trained replacements (none in"),
    Case("eval-replacements-truncated", ["circuits", "eval", "--model", "{M}", "--no-samples", "--replacements", "{REP_TRUNC}"],
         "corrupt or truncated checkpoint"),
    Case("replacements-invalid-json", ["trace", "the cat", "--model", "{M}", "--replacements", "{REP_BADJSON}"],
         "is not valid JSON"),
    Case("replacements-config-list", T + ["--replacements", "{REP_LIST}"], "is not a replacements config"),
    Case("replacements-entry-names-another-module", T + ["--replacements", "{REP_SWAPPED}"],
         "holds layer0.transcoder, but config.json lists it as layer0.lorsa"),  # it said layer0.transcoder was missing
    Case("replacements-file-outside", T + ["--replacements", "{REP_ESCAPE}"], "'../../etc/passwd' outside its folder"),
    Case("replacements-truncated-module", T + ["--replacements", "{REP_TRUNC}"], "corrupt or truncated checkpoint"),
    Case("replacements-config-claims-huge-module", T + ["--replacements", "{REP_HUGE}"],
         "does not match its own config: size mismatch"),  # never allocated: the module is built on the meta device
    Case("replacements-nan-weights", ["trace", "the cat", "--model", "{M}", "--replacements", "{REP_NAN}",
                                      "--out", "{WORLD}/new/nested/out"], "NaN or infinite"),
    # weights of another type were cast to float and traced (the graph quietly another)
    Case("replacements-damaged-bytes", T + ["--replacements", "{REP_FLIP}"],
         "layer0.transcoder.safetensors is damaged: its bytes differ from those saved"),  # it traced another graph
    Case("replacements-crc-not-a-number", T + ["--replacements", "{REP_CRCSTR}"],
         "the crc32 of layer0.transcoder is '12', not a whole number"),  # the damage check was skipped
    Case("replacements-int-weights", T + ["--replacements", "{REP_INT}"], "tensor W_enc is int32; a module's tensors are"),
    Case("replacements-fp8-weights", T + ["--replacements", "{REP_FP8}"], "tensor W_dec is float8_e4m3fn"),
    Case("replacements-zero-rope-scaling", T + ["--replacements", "{REP_ROPE0}"], "rope_scaling must be one positive number"),
    # output folders and writing
    Case("out-is-a-file", ["trace", "the cat", "--model", "{M}", "--out", "{PREV}/graph.json"],
         "graph.json is a file, not a folder"),
    Case("out-is-a-device", ["trace", "the cat", "--model", "{M}", "--out", "/dev/null"],
         "--out /dev/null is a file, not a folder"),
    Case("out-under-a-file", ["trace", "the cat", "--model", "{M}", "--out", "{PREV}/graph.json/sub"],
         "cannot write to --out"),
    Case("dot-fails", T + ["--format", "json,dot,svg"], "dot failed: Error: syntax error", path="{FAILDOT}"),
    Case("disk-full", ["trace", "the cat", "--model", "{M}"], "disk full?", fsize=4096),
    # graph files: `circuits query` and `circuits render`
    Case("query-missing-file", ["circuits", "query", "{WORLD}/nope.json"], "No such file or directory"),
    Case("query-directory", ["circuits", "query", "{WORLD}"], "is a folder with no graph.json in it"),
    Case("query-empty-file", ["circuits", "query", "{G}/empty.json"], "invalid JSON"),
    Case("query-truncated", ["circuits", "query", "{G}/truncated.json"], "invalid JSON"),
    Case("query-empty-object", ["circuits", "query", "{G}/object.json"], "'metadata' is a required property"),
    Case("query-list", ["circuits", "query", "{G}/list.json"], "the top level is a list"),
    Case("query-binary", ["circuits", "query", "{G}/binary.json"], "not UTF-8 text"),
    Case("query-dangling-edge", ["circuits", "query", "{G}/dangling.json"], "is not a node of the graph"),
    Case("query-wrong-types", ["circuits", "query", "{G}/types.json"], "does not follow the graph schema at nodes/0/ctx_idx"),
    Case("query-schema-version-2", ["circuits", "query", "{G}/v2.json"], "unsupported graph schema version 2"),
    Case("query-deeply-nested", ["circuits", "query", "{G}/nested.json"], "nested too deeply"),
    Case("query-nan", ["circuits", "query", "{G}/nan.json"], "NaN is not a number in strict JSON"),
    Case("query-huge-number", ["circuits", "query", "{G}/huge.json"], "too large for a float"),
    Case("render-huge-integer", ["circuits", "render", "{G}/bigint.json", "--format", "dot"],
         "is too large for a float"),  # an integer, not 1e400: it passed, and render raised OverflowError
    Case("query-weight-beyond-float32", ["circuits", "query", "{G}/bigweight.json"], "too large (beyond float32)"),
    Case("query-weights-sum-beyond-float32", ["circuits", "query", "{G}/bigsum.json", "--paths", "3"],
         "sum beyond float32"),  # it said no edge reached the logit
    Case("query-duplicate-ids", ["circuits", "query", "{G}/duplicate.json"], "appears twice"),
    Case("query-null-activation", ["circuits", "query", "{G}/null.json"], "has no activation"),
    Case("render-huge-layer", ["circuits", "render", "{G}/hugelayer.json", "--format", "dot"],
         "has model_layer 1000000000000, not a whole number from -1 to 4096"),
    Case("render-position-beyond-prompt", ["circuits", "render", "{G}/farpos.json", "--format", "dot"],
         "has ctx_idx 99, not a whole number from 0 to"),
    Case("query-no-logit", ["circuits", "query", "{G}/nologit.json"], "has no logit node"),
    # a node moved by its fields but not its id (two embeddings at one position, none at another), impossible links
    Case("query-id-not-its-fields", ["circuits", "query", "{G}/moved.json"], "node id 'emb@1' does not match its fields"),
    Case("render-link-backwards", ["circuits", "render", "{G}/backwards.json", "--format", "dot"], "runs backwards"),
    Case("query-self-loop", ["circuits", "query", "{G}/selfloop.json"], "runs backwards"),
    Case("query-link-twice", ["circuits", "query", "{G}/twice.json"], "appears twice"),
    Case("query-link-to-earlier-position", ["circuits", "query", "{G}/earlier.json"], "runs backwards"),
    Case("render-null-score", ["circuits", "render", "{G}/nullscore.json"], "metadata.scores.replacement_score is None"),
    Case("query-bad-qk", ["circuits", "query", "{G}/badqk.json"], "does not follow the graph schema"),
    Case("query-unknown-node", ["circuits", "query", "{G}/good.json", "--node", "emb@99"], "no node 'emb@99'"),
    Case("query-node-escape", ["circuits", "query", "{G}/good.json", "--node", "\x1b[2Jx"], "no node '\\x1b[2Jx'"),
    Case("query-paths-0", ["circuits", "query", "{G}/good.json", "--paths", "0"], "--paths must be between 1 and 100"),
    Case("query-node-and-to", ["circuits", "query", "{G}/good.json", "--node", "emb@1", "--to", "emb@2"],
         "--node and --paths/--to ask different questions; give one of them"),  # was: --to dropped unsaid
    Case("query-type-and-paths", ["circuits", "query", "{G}/good.json", "--type", "lorsa", "--paths", "2"],
         "--paths/--to and --type/--layer/--position ask different questions"),
    Case("query-empty-node", ["circuits", "query", "{G}/good.json", "--node", ""], "--node is empty"),
    Case("query-unknown-type", ["circuits", "query", "{G}/good.json", "--type", "heads"],
         "Invalid value for '--type': 'heads' is not one of 'embedding', 'lorsa'"),  # was: nothing listed, exit 0
    Case("query-paths-huge", ["circuits", "query", "{G}/good.json", "--paths", "99999999999999999999"],
         "--paths must be between 1 and 100"),
    Case("query-device-file", ["circuits", "query", "/dev/zero"], "not a regular file"),
    Case("render-unknown-format", ["circuits", "render", "{G}/good.json", "--format", "pdf"], "unknown format"),
    Case("render-truncated", ["circuits", "render", "{G}/truncated.json"], "invalid JSON"),
    Case("render-binary", ["circuits", "render", "{G}/binary.json"], "not UTF-8 text"),
    Case("render-nested", ["circuits", "render", "{G}/nested.json"], "nested too deeply"),
    # other commands
    Case("correspond-no-such-layer", ["circuits", "correspond", "--model", "{M}", "--layer", "0,9"], "no Lorsa for layer 9"),
    Case("correspond-layer-text", ["circuits", "correspond", "--model", "{M}", "--layer", "x"],
         "Invalid value for --layer: use comma-separated integers"),
    Case("correspond-share-0", ["circuits", "correspond", "--model", "{M}", "--layer", "0", "--share", "0"],
         "Invalid value for '--share'"),
    Case("correspond-out-unwritable", ["circuits", "correspond", "--model", "{M}", "--layer", "0", "--out", "/proc/nope/x"],
         "cannot write to --out"),
    Case("patch-invalid-utf8-target", ["circuits", "patch", "1 + 2 =", "--model", "{M}", "--component", "mlp_err.0@1",
                                       "--target", b"\xff"], "--target is not valid UTF-8"),
    Case("patch-feature-out-of-range", ["circuits", "patch", "1 + 2 =", "--model", "{M}", "--component", "tc.0.99999@1"],
         "feature 99999 does not exist (layer 0 has"),
    Case("patch-head-out-of-range", ["circuits", "patch", "1 + 2 =", "--model", "{M}", "--component", "lorsa.1.99999@1"],
         "Lorsa head 99999 does not exist (layer 1 has"),
    Case("patch-empty-counterfactual", ["circuits", "patch", "1 + 2 =", "--model", "{M}", "--component", "mlp_err.0@1",
                                        "--mode", "counterfactual", "--counterfactual", "   "], "the counterfactual prompt is empty"),
    # patch options that were silently ignored: a zero ablation on the top token reported as what was asked
    Case("patch-counterfactual-without-its-mode", ["circuits", "patch", "1 + 2 =", "--model", "{M}", "--component",
                                                   "mlp_err.0@1", "--counterfactual", "1 + 3 ="],
         "--counterfactual is used only with --mode counterfactual (the mode is zero)"),
    Case("patch-mean-over-without-its-mode", ["circuits", "patch", "1 + 2 =", "--model", "{M}", "--component",
                                              "mlp_err.0@1", "--mean-over", "{TEXT}"],
         "--mean-over is used only with --mode mean (the mode is zero)"),
    Case("patch-baseline-is-target", ["circuits", "patch", "1 + 2 =", "--model", "{M}", "--component", "mlp_err.0@1",
                                      "--target", " 3", "--baseline", " 3"], "--baseline ' 3' is the target itself"),
    Case("replacements-a-file", T + ["--replacements", "{TEXT}"], "is a file, not a replacements folder"),
    Case("patch-empty-target", ["circuits", "patch", "1 + 2 =", "--model", "{M}", "--component", "mlp_err.0@1",
                                "--target", ""], "--target '' is not a single token"),
    Case("patch-empty-mean-over", ["circuits", "patch", "1 + 2 =", "--model", "{M}", "--component", "mlp_err.0@1",
                                   "--mode", "mean", "--mean-over", " "], "--mean-over is empty"),
    Case("eval-text-binary", ["circuits", "eval", "--model", "{M}", "--no-samples", "--text", "{M}/model.safetensors"],
         "is not UTF-8 text"),  # was: evaluated on the bytes decoded as U+FFFD
    Case("eval-text-folder", ["circuits", "eval", "--model", "{M}", "--no-samples", "--text", "{WORLD}"], "is a folder"),
    Case("train-modules-beyond-memory", ["circuits", "train", "--model", "{M}", "--lorsa-heads-per-group", "1000000000000"],
         "parameters needs about"),  # was: an allocator RuntimeError traceback
    Case("train-cache-activations-is-a-file", ["circuits", "train", "--model", "{M}", "--cache-activations", "{TEXT}"],
         "text.txt is a file, not a folder"),  # was: "File exists", after caching began
    Case("train-batch-beyond-memory", ["circuits", "train", "--model", "{M}", "--batch-size", "1000000000000",
                                       "--text", "{TEXT}"], "a step of --batch-size 1000000000000 x --seq-len"),  # was a traceback
    Case("train-transcoder-option-for-lorsa", ["circuits", "train", "--model", "{M}", "--what", "lorsa", "--tc-expansion",
                                               "2"], "--tc-expansion sets the transcoders; this run trains --what lorsa only"),
    Case("train-joint-without-a-loss", ["circuits", "train", "--model", "{M}", "--joint", "--kl-coef", "0", "--recon-coef",
                                        "0", "--tc-readout-coef", "0"], "the joint stage would have nothing to fit"),
    Case("trace-frozen-with-qk", T + ["--attention", "frozen", "--qk-heads", "5"],
         "--qk-heads sets the Lorsa heads' QK explanations; --attention frozen has no Lorsa heads"),
    Case("train-top-k-beyond-features", ["circuits", "train", "--model", "{M}", "--what", "transcoder", "--tc-top-k",
                                         "100000"], "layer 0's transcoder: --tc-top-k 100000 is not between"),
    Case("train-long-seq-len-and-bad-top-k", ["circuits", "train", "--model", "{M}", "--what", "transcoder", "--seq-len",
                                              "1000", "--tc-top-k", "100000"],  # the length's note waits for the checks
         "layer 0's transcoder: --tc-top-k 100000 is not between"),
    Case("train-joint-batch-beyond-memory", ["circuits", "train", "--model", "{M}", "--joint", "--batch-size",
                                             "1000000000000", "--text", "{TEXT}"], "out of memory: an allocation of"),
    Case("train-lr-past-float32", ["circuits", "train", "--model", "{M}", "--lr", "1e308"],
         "Invalid value for '--lr': 1e+308 is not in the range 0<x<=1"),  # was a RuntimeError traceback
    Case("train-bos-weight-nan", ["circuits", "train", "--model", "{M}", "--lorsa-bos-weight", "nan"],
         "Invalid value for '--lorsa-bos-weight'"),  # was: trained, then "loss is nan"
    Case("train-jacobian-negative", ["circuits", "train", "--model", "{M}", "--tc-jacobian", "-1"],
         "Invalid value for '--tc-jacobian'"),
    Case("train-out-uncreatable", ["circuits", "train", "--model", "{M}", "--out", "/proc/nope/x", "--text", "{TEXT}"],
         "cannot create the output folder /proc/nope/x"),  # was: the same error at the first checkpoint
    Case("train-lorsa-top-k-0", ["circuits", "train", "--model", "{M}", "--lorsa-top-k", "0"], "Invalid value for '--lorsa-top-k'"),
    Case("train-lorsa-top-k-too-many", ["circuits", "train", "--model", "{M}", "--what", "lorsa", "--lorsa-top-k", "100000",
                                        "--steps", "1", "--text", "{TEXT}", "--out", "{WORLD}/new-train"],
         "layer 0's lorsa: --lorsa-top-k 100000 is more than its"),
    Case("heads-n-seqs-beyond-memory", ["circuits", "heads", "--model", "{M}", "--layer", "0", "--n-seqs", "1000000000000"],
         "--n-seqs 1000000000000 needs about"),  # was: scanned and kept codes until the kernel killed it
    Case("heads-cache-dir-uncreatable", ["circuits", "heads", "--model", "{M}", "--layer", "0", "--cache-dir", "/proc/nope/x"],
         "cannot create the dashboard cache /proc/nope/x/"),  # was: the same error, after the whole scan
    Case("heads-cache-dir-is-a-file", ["circuits", "heads", "--model", "{M}", "--layer", "0", "--cache-dir", "{G}/good.json"],
         "is a file, not a folder"),
    Case("train-out-is-a-file", ["circuits", "train", "--model", "{M}", "--out", "{G}/good.json"],
         "is a file, not a folder"),
    Case("train-kl-coef-nan", ["circuits", "train", "--model", "{M}", "--joint", "--kl-coef", "nan"], "is not a finite number"),
    Case("train-joint-with-a-per-layer-option", ["circuits", "train", "--model", "{M}", "--joint", "--tc-skip"],
         "--tc-skip sets the per-layer stage"),
    Case("train-joint-option-without-joint", ["circuits", "train", "--model", "{M}", "--recon-coef", "2"],
         "--recon-coef sets the joint stage; add --joint"),
    Case("train-readout-without-joint", ["circuits", "train", "--model", "{M}", "--tc-readout-coef", "1"],
         "--tc-readout-coef sets the joint stage; add --joint"),
    Case("train-zero-steps", ["circuits", "train", "--model", "{M}", "--joint", "--steps", "0"],
         "Invalid value for '--steps'"),
    Case("train-corpora-only-and-text", ["circuits", "train", "--model", "{M}", "--corpora-only", "--text", "{TEXT}"],
         "--corpora-only picks the text itself"),
    Case("train-corpora-only-without-corpora", ["circuits", "train", "--model", "{M}", "--corpora-only"],
         "no training corpus", env={"CIRCUITS_DATA": "/nonexistent/corpora"}),
    Case("train-negative-lr", ["circuits", "train", "--model", "{M}", "--lr", "-1e-3"], "Invalid value for '--lr'"),
    Case("family-cosine-without-families", T + ["--no-families", "--family-cosine", "0.5"],
         "--family-cosine is used only with families"),
    Case("patch-bad-component-before-loading", ["circuits", "patch", "the cat", "--model", "{M}", "--component",
                                                "L0.X1@2"], "cannot parse component 'L0.X1@2'"),
    Case("train-seq-len-two", ["circuits", "train", "--model", "{M}", "--seq-len", "2", "--text", "{TEXT}"],
         "Invalid value for '--seq-len'"),
    Case("patch-family-baseline", ["circuits", "patch", "the cat", "--model", "{M}", "--family", "fam.lorsa.1.0@2",
                                   "--baseline", " the"], "--baseline cannot go with --family"),
    Case("train-lm-zero-steps", ["circuits", "train-lm", "--model", "toy", "--steps", "0"], "Invalid value for '--steps'"),
    Case("train-resume-other-expansion", ["circuits", "train", "--model", "{M}", "--what", "transcoder", "--layers", "1",
                                          "--steps", "4", "--batch-size", "4", "--seq-len", "16", "--tc-expansion", "4",
                                          "--text", "{TEXT}", "--out", "{TRAIN}"], "other settings (tc_expansion 2 -> 4)"),
    Case("train-resume-nan-state", ["circuits", "train", "--model", "{M}", "--what", "transcoder", "--layers", "1",
                                    "--steps", "4", "--batch-size", "4", "--seq-len", "16", "--tc-expansion", "2",
                                    "--text", "{TEXT}", "--out", "{TRAIN_NAN}"], "start afresh with --no-resume"),
    Case("train-resume-state-without-step", ["circuits", "train", "--model", "{M}", "--what", "transcoder", "--layers",
                                             "1", "--steps", "4", "--batch-size", "4", "--seq-len", "16",
                                             "--tc-expansion", "2", "--text", "{TEXT}", "--out", "{TRAIN_NOSTEP}"],
         "is not a complete training state"),
    Case("train-resume-state-missing-a-tensor", ["circuits", "train", "--model", "{M}", "--what", "transcoder",
                                                 "--layers", "1", "--steps", "4", "--batch-size", "4", "--seq-len",
                                                 "16", "--tc-expansion", "2", "--text", "{TEXT}", "--out",
                                                 "{TRAIN_NOTENSOR}"], "is not a complete training state"),
    *[Case(f"train-resume-state-{what}", ["circuits", "train", "--model", "{M}", "--what", "transcoder", "--layers", "1",
                                          "--steps", "4", "--batch-size", "4", "--seq-len", "16", "--tc-expansion", "2",
                                          "--text", "{TEXT}", "--out", "{%s}" % name], expect)
      for what, name, expect in (("moment-of-another-shape", "TRAIN_BADOPT", "optimizer state"),
                                 ("freq-of-another-shape", "TRAIN_BADFREQ", ".freq has shape [3]"),
                                 ("inputs-not-an-object", "TRAIN_INPUTS", "its inputs record is a list"))],
]


def _subst(arg, names: dict):
    if isinstance(arg, bytes):
        return arg
    for k, v in names.items():
        arg = arg.replace("{" + k + "}", str(v))
    return arg


def _snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.join(dirpath, d)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(saved_model, tmp_path_factory):
    from replacement import checkpoint as ckpt

    w = tmp_path_factory.mktemp("world")
    names = {"WORLD": w, "M": w / "model", "PREV": w / "prev", "G": w / "graphs", "TEXT": w / "text.txt"}
    shutil.copytree(saved_model, names["M"])
    names["PREV"].mkdir()
    (names["PREV"] / "graph.json").write_text("an earlier run's graph\n")
    (names["PREV"] / "graph.svg").write_text("<svg/>\n")
    names["TEXT"].write_text("the cat sat on the mat and the dog sat on the log.\n" * 200)
    for name, fill in (("NODOT", None), ("FAILDOT", "#!/bin/sh\necho 'Error: syntax error in line 1' >&2\nexit 1\n")):
        folder = names[name] = w / name.lower()
        folder.mkdir()
        if fill:
            (folder / "dot").write_text(fill)
            (folder / "dot").chmod(0o755)
    _broken_models(w, names)
    _broken_replacements(w, names, ckpt)
    _graph_files(w, names)
    _training_states(w, names, ckpt)
    return names


def _broken_models(w: Path, names: dict) -> None:
    from safetensors.torch import load_file, save_file

    m = names["M"]
    names["EMPTY"] = w / "empty-model"
    names["EMPTY"].mkdir()
    names["BADCONFIG"] = w / "bad-config"
    shutil.copytree(m, names["BADCONFIG"], ignore=shutil.ignore_patterns("replacements"))
    (names["BADCONFIG"] / "config.json").write_text('{"model_type": "llama", ')
    for key, field, value in (("MANYLAYERS", "num_hidden_layers", 10**12), ("NOLAYERS", "num_hidden_layers", 0),
                              ("WIDTH0", "hidden_size", 0), ("CTXNEG", "max_position_embeddings", -1),
                              ("WIDTHTEXT", "hidden_size", "wide")):
        names[key] = w / key.lower()
        shutil.copytree(m, names[key], ignore=shutil.ignore_patterns("replacements"))
        config = json.loads((names[key] / "config.json").read_text())
        (names[key] / "config.json").write_text(json.dumps({**config, field: value}))
    names["TRUNCATED"] = w / "truncated"
    shutil.copytree(m, names["TRUNCATED"], ignore=shutil.ignore_patterns("replacements"))
    weights = names["TRUNCATED"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    names["PICKLE"] = w / "pickle-only"
    shutil.copytree(m, names["PICKLE"], ignore=shutil.ignore_patterns("replacements", "*.safetensors"))
    (names["PICKLE"] / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    names["PICKLEMIX"] = w / "pickle-and-other-safetensors"  # an unrelated .safetensors beside the pickle
    shutil.copytree(names["PICKLE"], names["PICKLEMIX"])
    shutil.copy(m / "model.safetensors", names["PICKLEMIX"] / "extra.safetensors")
    names["NANMODEL"] = w / "nan-model"
    shutil.copytree(m, names["NANMODEL"])
    tensors = load_file(str(names["NANMODEL"] / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(names["NANMODEL"] / "model.safetensors"), metadata={"format": "pt"})
    _refingerprint(names["NANMODEL"])


def _refingerprint(folder: Path) -> None:
    """Mark the replacements in ``folder`` as trained on the (modified) model there."""
    from replacement import checkpoint as ckpt
    from replacement.models import load_model, model_fingerprint

    fp = model_fingerprint(load_model(str(folder)))
    rep = folder / "replacements"
    for f in rep.glob("*.safetensors"):
        tensors, meta = ckpt.load(f)
        ckpt.atomic_save(tensors, f, {**meta, "fingerprint": fp})
    cfg = json.loads((rep / "config.json").read_text())
    (rep / "config.json").write_text(json.dumps({**cfg, "fingerprint": fp}))
    rechecksum(rep)


def _broken_replacements(w: Path, names: dict, ckpt) -> None:
    rep = names["M"] / "replacements"

    def variant(name: str) -> Path:
        names[name] = w / name.lower()
        shutil.copytree(rep, names[name])
        return names[name]

    (variant("REP_BADJSON") / "config.json").write_text('{"modules": {')
    (variant("REP_LIST") / "config.json").write_text("[1]")
    cfg_path = variant("REP_SWAPPED") / "config.json"  # an entry naming another module's file
    cfg = json.loads(cfg_path.read_text())
    cfg["modules"]["layer0.lorsa"]["file"] = "layer0.transcoder.safetensors"
    cfg_path.write_text(json.dumps(cfg))
    cfg_path = variant("REP_ESCAPE") / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["modules"]["layer0.lorsa"]["file"] = "../../etc/passwd"
    cfg_path.write_text(json.dumps(cfg))
    module = variant("REP_TRUNC") / "layer1.transcoder.safetensors"
    module.write_bytes(module.read_bytes()[:100])
    module = variant("REP_HUGE") / "layer0.transcoder.safetensors"  # its config: 100 billion features
    tensors, meta = ckpt.load(module)
    ckpt.atomic_save(tensors, module, {**meta, "config": {**meta["config"], "n_features": 10**11}})
    module = variant("REP_NAN") / "layer0.transcoder.safetensors"
    tensors, meta = ckpt.load(module)
    tensors["W_dec"] = torch.full_like(tensors["W_dec"], float("nan"))
    ckpt.atomic_save(tensors, module, meta)
    rechecksum(names["REP_NAN"])  # saved so (NaN from training): its checksum is the file's
    module = variant("REP_FLIP") / "layer0.transcoder.safetensors"  # bytes damaged since: still weights, not those
    data = bytearray(module.read_bytes())
    data[-40] ^= 0x10
    module.write_bytes(bytes(data))
    cfg_path = variant("REP_CRCSTR") / "config.json"  # a checksum edited into text (or a float)
    cfg = json.loads(cfg_path.read_text())
    cfg["modules"]["layer0.transcoder"]["crc32"] = "12"
    cfg_path.write_text(json.dumps(cfg))
    for name, key, dtype in (("REP_INT", "W_enc", torch.int32), ("REP_FP8", "W_dec", torch.float8_e4m3fn)):
        module = variant(name) / "layer0.transcoder.safetensors"
        tensors, meta = ckpt.load(module)
        tensors[key] = (tensors[key] * 10).to(dtype)
        ckpt.atomic_save(tensors, module, meta)
    module = variant("REP_ROPE0") / "layer0.lorsa.safetensors"
    tensors, meta = ckpt.load(module)
    tensors["rope_scaling"] = torch.zeros_like(tensors["rope_scaling"])
    ckpt.atomic_save(tensors, module, meta)


def _graph_files(w: Path, names: dict) -> None:
    from graphs.attribution import attribute
    from graphs.export import to_dict
    from graphs.prune import prune
    from replacement.assemble import ReplacementModel
    from replacement.models import load_model

    g = names["G"]
    g.mkdir()
    adapter = load_model(str(names["M"]))
    graph = prune(attribute(ReplacementModel.load(adapter), "the cat sat", qk_heads=2), 0.9, 0.98)
    d = to_dict(graph)
    good = json.dumps(d)
    (g / "good.json").write_text(good)
    (g / "empty.json").write_text("")
    (g / "truncated.json").write_text(good[: len(good) // 2])
    (g / "object.json").write_text("{}")
    (g / "list.json").write_text("[1]")
    (g / "binary.json").write_bytes(bytes(range(256)) * 4)
    (g / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    (g / "nan.json").write_text(good.replace('"influence": ', '"influence": NaN, "x": ', 1))
    (g / "huge.json").write_text(good.replace('"influence": ', '"influence": 1e999, "x": ', 1))

    def mutated(name: str, change) -> None:
        x = json.loads(good)
        change(x)
        (g / name).write_text(json.dumps(x))

    mutated("dangling.json", lambda x: x["links"].append({"source": "emb@0", "target": "tc.9.9@99", "weight": 1.0,
                                                           "kind": "direct"}))
    mutated("types.json", lambda x: x["nodes"][0].update(ctx_idx="a"))
    mutated("bigint.json", lambda x: x["nodes"][-1].update(activation=10**400, influence=-10**400))
    mutated("bigweight.json", lambda x: [e.update(weight=1e308) for e in x["links"]])
    mutated("bigsum.json", lambda x: [e.update(weight=-3e38) for e in x["links"]])  # each fits float32, sums do not
    mutated("v2.json", lambda x: x["metadata"].update(schema_version=2))
    mutated("duplicate.json", lambda x: x["nodes"].append(dict(x["nodes"][0])))
    mutated("null.json", lambda x: x["nodes"][0].update(activation=None))
    mutated("hugelayer.json", lambda x: x["nodes"][-1].update(model_layer=10**12))
    mutated("farpos.json", lambda x: x["nodes"][0].update(ctx_idx=99))
    mutated("nologit.json", lambda x: x.update(nodes=[n for n in x["nodes"] if n["type"] != "logit"],
                                               links=[e for e in x["links"] if not e["target"].startswith("logit")]))
    mutated("nullscore.json", lambda x: x["metadata"]["scores"].update(replacement_score=None))
    mutated("moved.json", lambda x: next(n for n in x["nodes"] if n["node_id"] == "emb@1").update(ctx_idx=2))
    logit = next(n["node_id"] for n in d["nodes"] if n["type"] == "logit")
    mutated("backwards.json", lambda x: x["links"].append({"source": logit, "target": "emb@1", "weight": 1.0, "kind": "direct"}))
    some = d["links"][0]
    mutated("selfloop.json", lambda x: x["links"].append({**some, "target": some["source"]}))
    mutated("twice.json", lambda x: x["links"].append(dict(some)))
    last = len(d["metadata"]["prompt_tokens"]) - 1  # the last token's embedding into a head at an earlier position
    head_before = next(n for n in d["nodes"] if n["type"] in ("lorsa", "transcoder") and n["ctx_idx"] < last)
    mutated("earlier.json", lambda x: x["links"].append({"source": f"emb@{last}", "target": head_before["node_id"],
                                                         "weight": 1.0, "kind": "ov"}))
    head = next(i for i, n in enumerate(d["nodes"]) if n.get("qk"))
    mutated("badqk.json", lambda x: x["nodes"][head]["qk"][0].update(pairs=[["a", "b"]]))


def _training_states(w: Path, names: dict, ckpt) -> None:
    """An interrupted `circuits train` (its state file), and a copy of it holding a NaN."""
    from replacement.activations import TextSource
    from replacement.models import load_model
    from replacement.train import TrainConfig, Trainer

    adapter = load_model(str(names["M"]))
    cfg = TrainConfig(what="transcoder", layers=[1], steps=4, batch_size=4, seq_len=16, tc_expansion=2)
    names["TRAIN"] = w / "train"
    state = names["TRAIN"] / ".train_state.transcoder.safetensors"
    Trainer(adapter, cfg, TextSource(adapter.tokenizer, [str(names["TEXT"])], 16, cfg.seed), state).train(
        progress=False, stop_after=2)
    names["TRAIN_NAN"] = w / "train-nan"
    shutil.copytree(names["TRAIN"], names["TRAIN_NAN"])
    tensors, meta = ckpt.load(names["TRAIN_NAN"] / state.name)
    key = next(k for k in tensors if ".param.W_enc" in k)
    tensors[key][0, 0] = float("nan")
    ckpt.atomic_save(tensors, names["TRAIN_NAN"] / state.name, meta)
    for name, drop_step in (("TRAIN_NOSTEP", True), ("TRAIN_NOTENSOR", False)):  # cut short: a step or a tensor gone
        names[name] = w / name.lower()
        shutil.copytree(names["TRAIN"], names[name])
        tensors, meta = ckpt.load(names[name] / state.name)
        if drop_step:
            meta = {k: v for k, v in meta.items() if k != "step"}
        else:
            del tensors[next(k for k in tensors if k.endswith(".since_fired"))]
        ckpt.atomic_save(tensors, names[name] / state.name, meta)
    for name, edit in (("TRAIN_BADOPT", "moment"), ("TRAIN_BADFREQ", "freq"), ("TRAIN_INPUTS", "inputs")):
        names[name] = w / name.lower()  # edited: each was a traceback (Adam's first step, the freq update, .get)
        shutil.copytree(names["TRAIN"], names[name])
        tensors, meta = ckpt.load(names[name] / state.name)
        if edit == "moment":
            tensors[next(k for k in tensors if k.endswith(".exp_avg"))] = torch.zeros(3)
        elif edit == "freq":
            tensors[next(k for k in tensors if k.endswith(".freq"))] = torch.zeros(3)
        else:
            meta["inputs"] = [1, 2]
        ckpt.atomic_save(tensors, names[name] / state.name, meta)


@pytest.fixture(scope="module")
def cli():
    server = CliServer()
    yield server
    server.close()


def run_cli(cli: CliServer, args: list, cwd: Path, path: str | None = None, fsize: int | None = None,
            env: dict | None = None):
    """One case in a process of its own (forked from a server that has done the imports; tests/forked_cli.py).
    A file-size limit makes writes past it fail with EFBIG, as a full disk would (Python ignores SIGXFSZ)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "CIRCUITS_CACHE": str(cwd / "cache"), **(env or {})}
    if path is not None:
        full_env["PATH"] = path
    return cli.run(args, cwd, full_env, fsize=fsize, timeout=300)


def test_corpus_is_large_enough():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world, cli):
    before = _snapshot(world["WORLD"])
    args = [_subst(a, world) for a in case.args]
    r = run_cli(cli, args, world["WORLD"], _subst(case.path, world) if case.path else None, case.fsize, case.env)
    stderr = r.stderr.decode("utf-8", errors="replace")
    lines = stderr.splitlines()
    assert r.returncode != 0, (case.id, r.stdout[-2000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert case.expect in lines[0], lines[0]
    assert _snapshot(world["WORLD"]) == before  # no file created, removed or changed
