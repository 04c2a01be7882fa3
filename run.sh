#!/usr/bin/env bash
# pefref's two commands (see README.md):
#   ./run.sh              set up, then run the main job on the embedded defaults
#                         (validate the catalog, list it, run the demo, train and
#                         compare techniques on the real MiniLM: results/)
#   ./run.sh test [ARGS]  set up, then run the whole test suite (ARGS go to pytest)
#
# Setup is idempotent: it creates .venv when missing (python3.11, else python3),
# installs torch==2.13.0 first (the local CPU wheel; never an unpinned torch),
# installs graphviz's `dot` when missing and installable, then the package with
# its test extras (again only when pyproject.toml changed since the last install).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV="${PEFREF_VENV:-.venv}"
TORCH_VERSION="2.13.0"
# an extra pip constraint on transformers for this venv (CI's second environment: 'transformers>=4.57,<4.58')
TRANSFORMERS_PIN="${PEFREF_TRANSFORMERS:-}"
STAMP="$VENV/.pefref-install"

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

pick_python() {
  local py
  for py in ${PEFREF_PYTHON:-} python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      echo "$py"
      return 0
    fi
  done
  die "pefref needs Python >= 3.10 (python3.11 or python3 on PATH)"
}

ensure_venv() {
  if [ -x "$VENV/bin/python" ]; then
    return 0
  fi
  local py
  py="$(pick_python)"
  log "creating $VENV with $py ($("$py" --version 2>&1))"
  "$py" -m venv "$VENV" || die "could not create $VENV (on Debian/Ubuntu: apt-get install python3-venv)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
}

ensure_torch() {
  if "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    return 0
  fi
  log "installing torch==$TORCH_VERSION"
  "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
}

ensure_dot() {
  if command -v dot >/dev/null 2>&1; then
    return 0
  fi
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing graphviz (dot) with apt-get"
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null 2>&1; }; then
      return 0
    fi
    warn "apt-get could not install graphviz; diagrams will be DOT text only"
  else
    warn "graphviz's 'dot' is missing and cannot be installed here (needs apt-get as root); diagrams will be DOT text only"
  fi
}

ensure_chromium() {
  # Debian's chromium and chromedriver drive the site's browser tests (tests/test_site_browser.py).
  if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    return 0
  fi
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing chromium and chromium-driver with apt-get"
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; }; then
      return 0
    fi
    warn "apt-get could not install chromium; the site's browser tests will fail"
  else
    warn "chromium and chromedriver are missing and cannot be installed here (needs apt-get as root); the site's browser tests will fail"
  fi
}

install_hash() {
  "$VENV/bin/python" - <<EOF
import hashlib
h = hashlib.sha256(open("pyproject.toml", "rb").read())
h.update(b"torch==$TORCH_VERSION $TRANSFORMERS_PIN")
print(h.hexdigest())
EOF
}

ensure_package() {
  local want
  want="$(install_hash)"
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/pefref" ] \
    && "$VENV/bin/python" -c "import pefref.cli" 2>/dev/null; then
    return 0
  fi
  log "installing pefref with its test extras (pip install -e '.[test]')"
  printf 'torch==%s\n' "$TORCH_VERSION" > "$VENV/constraints.txt"
  if [ -n "$TRANSFORMERS_PIN" ]; then printf '%s\n' "$TRANSFORMERS_PIN" >> "$VENV/constraints.txt"; fi
  "$VENV/bin/python" -m pip install --quiet -c "$VENV/constraints.txt" -e '.[test]'
  echo "$want" > "$STAMP"
}

setup() {
  ensure_venv
  ensure_torch
  ensure_dot
  ensure_chromium
  ensure_package
}

# The real experiment (README "Experiments"): the pretrained MiniLM on review polarity.
# One seed by default (8 runs); PEFREF_EXPERIMENT_SEEDS=all runs the three seeds.
# Finished runs are kept in results/, so a second ./run.sh skips them.
run_experiment() {
  local exp=catalog/experiments/minilm_rt_polarity.yaml out=results/minilm_rt_polarity
  local seeds=(--seed 0)
  [ "${PEFREF_EXPERIMENT_SEEDS:-0}" = all ] && seeds=()
  log "pefref run $exp -o $out ${seeds[*]} --jobs 2"
  "$VENV/bin/pefref" run "$exp" -o "$out" "${seeds[@]}" --jobs 2
  log "pefref results $out"
  "$VENV/bin/pefref" results "$out"
  # the comparison site with the results pages goes beside the results (site/ is the committed catalog site)
  log "pefref site --results $out -o $out/site"
  "$VENV/bin/pefref" site --results "$out" -o "$out/site"
  log "results: $out/results.sqlite, plots: $out/plots/*.svg, site: $out/site/results.html (and $out/site/index.html)"
}

main() {
  local mode="${1:-main}"
  case "$mode" in
    main)
      setup
      log "pefref validate"
      "$VENV/bin/pefref" validate
      log "pefref list"
      "$VENV/bin/pefref" list
      if "$VENV/bin/pefref" demo --help >/dev/null 2>&1; then
        log "pefref demo"
        "$VENV/bin/pefref" demo
      else
        warn "'pefref demo' is not available in this version; skipped"
      fi
      run_experiment
      ;;
    test)
      shift
      setup
      log "python -m pytest -n 2 -q $*"
      exec "$VENV/bin/python" -m pytest -n 2 -q "$@"
      ;;
    setup)
      setup
      ;;
    -h | --help | help)
      sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
      ;;
    *)
      die "unknown mode '$mode'; use ./run.sh, ./run.sh test [pytest args] or ./run.sh setup"
      ;;
  esac
}

main "$@"
