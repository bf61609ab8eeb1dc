# Sourced by setup_<peer>.sh: make (or reuse) one peer's own virtual environment, never nuclei-d2's.
#   peer_venv NAME SETUP_SCRIPT IMPORT_CHECK INSTALL_FUNCTION
# The venv is ${NUCLEI_D2_PEERS:-$HOME/.cache/nuclei-d2/peers}/NAME-<hash>, where <hash> is the first 10 hex digits
# of the sha256 of the setup script and this file: changing a pin makes a new venv. An existing venv is reused when
# IMPORT_CHECK (python code) passes in it. The venv path is printed as the last line.
set -euo pipefail

peer_venv() {
    local name=$1 script=$2 check=$3 install=$4
    local here hash root venv py
    here=$(cd "$(dirname "$script")" && pwd)
    hash=$(cat "$script" "$here/_venv.sh" | sha256sum | cut -c1-10)
    root=${NUCLEI_D2_PEERS:-$HOME/.cache/nuclei-d2/peers}
    venv=$root/$name-$hash
    py=${PYTHON:-python3.11}
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
        echo "reusing $venv" >&2
        echo "$venv"
        return 0
    fi
    echo "creating $venv with $py" >&2
    rm -rf "$venv"
    mkdir -p "$root"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$install" "$venv/bin/python" >&2
    "$venv/bin/python" -c "$check" >&2
    "$venv/bin/python" -m pip freeze > "$venv/freeze.txt"
    echo "$venv"
}

# True when the PyTorch CPU wheel index answers (it is not reachable on every machine).
torch_cpu_index_reachable() {
    "$1" - <<'PY' 2>/dev/null
import sys, urllib.request
try:
    urllib.request.urlopen("https://download.pytorch.org/whl/cpu/torch/", timeout=10)
except Exception:
    sys.exit(1)
PY
}
