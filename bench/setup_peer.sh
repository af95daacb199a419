#!/usr/bin/env bash
# Installs the peer, transfusion-pytorch 0.20.0, into its own venv for the comparisons in bench/ (never into the
# project's environment: it pins other versions of einops and friends). CPU torch first, so that pip does not pull
# the CUDA build. Override the location with TRANSFUSION_PEER_VENV (and point TRANSFUSION_PEER_PYTHON at its python).
set -euo pipefail
venv="${TRANSFUSION_PEER_VENV:-$HOME/.cache/transfusion-bench/peer-venv}"
python -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q transfusion-pytorch==0.20.0
"$venv/bin/python" -c "import transfusion_pytorch, torch; print('peer ready:', torch.__version__)"
