#!/usr/bin/env bash
# The GPU check in one command, also on a bare GPU image whose Python has PyTorch but lacks some of
# requirements.txt (MONAI and nibabel): wheels carried in ./.whl are installed into a temporary folder first.
#
#   bash bench/gpu_check.sh [bench/gpu_check.py flags]        # e.g. --out "$OUT/gpu_check.md"
#
# Fetch the wheels where pip reaches PyPI (both are pure Python, so no platform flags are needed):
#   python -m pip download --no-deps -d .whl monai==1.6.1 nibabel==5.4.2
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import monai, nibabel" 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "gpu_check.sh: $PYTHON cannot import monai and nibabel and ./.whl holds no wheels; fetch them with" \
             "'python -m pip download --no-deps -d .whl monai==1.6.1 nibabel==5.4.2' and bring .whl along" >&2
        exit 2
    fi
    site=$(mktemp -d /tmp/ichseg-site.XXXXXX)
    echo "$(date '+%F %T') installing $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')into $site" >&2
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_check.py "$@"
