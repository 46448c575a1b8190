#!/usr/bin/env bash
# One command for the peers benchmark (bench/README.md, "Peers"):
#
#   bash bench/peers/run.sh [ADMIN_URL] [run.py options...]
#
#   bash bench/peers/run.sh postgresql://postgres@127.0.0.1:5432/postgres --days 1 --rows-per-day 20000 --with-credit
#   bash bench/peers/run.sh --days 2 --rows-per-day 200000     # no URL: embedded PostgreSQL 16 in /tmp/peers_pg
#
# Creates, on first use, the project's venv (.venv, for the tally executable) and the
# peers' venvs under /tmp with the pinned versions below, then runs run.py with the
# project's Python. ADMIN_URL may also come from $BENCH_PG_URL.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SYS_PY="${BENCH_TOOL_PYTHON:-python3}"   # builds the tool venvs; any Python >= 3.9 (3.11 measured)

# --- pinned tool versions: full `pip freeze` of the venvs that were measured
SQLMESH_PKGS=(-r "$HERE/requirements-sqlmesh.txt")   # sqlmesh 0.236.4, sqlglot 30.8.0
DBT_PKGS=(-r "$HERE/requirements-dbt.txt")           # dbt-core 1.11.16, dbt-postgres 1.11.0 (keep 1.11.x)

mkvenv() {  # mkvenv DIR CHECK_BIN PKGS...
  local dir="$1" bin="$2"; shift 2
  if [[ ! -x "$dir/bin/$bin" ]]; then
    echo "creating $dir: pip install $*" >&2
    "$SYS_PY" -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip >&2
    "$dir/bin/pip" install -q "$@" >&2
  fi
}

# tally: the project's own venv (run.py uses the `tally` next to its interpreter)
PY="${BENCH_PYTHON:-$ROOT/.venv/bin/python}"
if [[ ! -x "$PY" ]]; then
  echo "creating $ROOT/.venv: pip install -e $ROOT" >&2
  "$SYS_PY" -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/pip" install -q -e "$ROOT" >&2
  PY="$ROOT/.venv/bin/python"
fi
mkvenv "${BENCH_VENV_SQLMESH:-/tmp/venv-sqlmesh}" sqlmesh "${SQLMESH_PKGS[@]}"
mkvenv "${BENCH_VENV_DBT:-/tmp/venv-dbt}" dbt "${DBT_PKGS[@]}"

URL="${BENCH_PG_URL:-}"
if [[ $# -gt 0 && "$1" == postgres* ]]; then URL="$1"; shift; fi
if [[ -z "$URL" ]]; then
  # no server given: start (or reuse) an embedded PostgreSQL 16 in /tmp/peers_pg, from the
  # pgserver wheel that tally itself depends on
  URL="$("$PY" -W ignore -c \
    "import pgserver; s = pgserver.get_server('/tmp/peers_pg', cleanup_mode=None); print(s.get_uri())" | tail -1)"
  echo "embedded server: $URL" >&2
fi

exec "$PY" "$HERE/run.py" --url "$URL" "$@"
