#!/usr/bin/env bash
# Create (or reuse) .venv/ in the repo root and install mlot with the pinned stack.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
stamp=".venv/.mlot-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on this machine.
$py -m pip install -q "torch==2.13.0"
# DeepSpeed ships as an sdist; DS_BUILD_OPS=0 keeps it a pure-Python build (ops are JIT-built on demand).
DS_BUILD_OPS=0 $py -m pip install -q -c constraints.txt -e ".[dev]"
$py -m pip check
echo "$want" > "$stamp"
