"""The recipe of the bundled language models: their presets (architectures), tokenizer training, training
corpora download, and the staged language-model training that `circuits train-lm` runs.

Nothing in the generic engine (`replacement.models`, `activations`, `train`, `store`, `graphs`, ...) imports
this package; it uses the engine.  Where the bundled models' folders are is `replacement.bundle`.
"""
