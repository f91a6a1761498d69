#!/usr/bin/env bash
# Builds a separate venv with circuit-tracer 0.5.0, for the slow test tests/test_circuit_tracer.py:
#   bash benchmarks/make_circuit_tracer_venv.sh [VENV_DIR]      (default: .venv-circuit-tracer)
#   CIRCUIT_TRACER_VENV=VENV_DIR python3 -m pytest -m slow tests/test_circuit_tracer.py
# torch is installed first and pinned (a CPU wheel where one lies on local disk); any other torch would be
# a multi-GB download. circuit-tracer 0.5.0 wants transformers<=4.57, so nnsight and transformer-lens are pinned
# to releases that agree with it.
set -euo pipefail
VENV="${1:-.venv-circuit-tracer}"
TORCH="${CIRCUIT_TRACER_TORCH:-torch==2.13.0}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$TORCH"
"$VENV/bin/pip" install -q "$TORCH" circuit-tracer==0.5.0 nnsight==0.6.1 transformer-lens==3.2.1
"$VENV/bin/python" -c "import circuit_tracer, torch; print('circuit-tracer ready, torch', torch.__version__)"
echo "export CIRCUIT_TRACER_VENV=$(cd "$VENV" && pwd)"
