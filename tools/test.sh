#!/usr/bin/env bash
# The README's test command: set up, lint (ruff), then run the whole test suite (arguments go to pytest).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash tools/setup.sh
venv=${MEGAMLM_VENV:-$root/.venv}
"$venv/bin/ruff" check --quiet "$root"   # the linter (pyproject.toml [tool.ruff]) first: it takes a second
exec "$venv/bin/python" -m pytest -q "$@"
