# Sourced by scripts/demo and scripts/test: make (once) and use the project's own venv, so both
# work where the system Python refuses pip (PEP 668: Debian 12, Ubuntu 24.04) and nothing is
# installed outside the checkout. STACKCTL_VENV overrides where it lives (default .venv).
venv="${STACKCTL_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    echo "python3 has no venv module (Debian/Ubuntu: apt-get install python3-venv); install it and rerun." >&2
    exit 1
  fi
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
