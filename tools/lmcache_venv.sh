#!/usr/bin/env bash
# Build the virtualenv in which `kvcache bench codecs` runs LMCache's CacheGen for its
# side-by-side rows. LMCache is never a dependency of kvcache: it lives in its own venv and
# the bench talks to it through tools/lmcache_cachegen_runner.py (safetensors + JSON).
#
#   tools/lmcache_venv.sh DIR
#   kvcache bench codecs --lmcache-python DIR/bin/python   # or KVCACHE_LMCACHE_PYTHON=...
#
# Recipe (LMCache 0.5.6 on CPU): CPU torch first, then `lmcache==0.5.6 --no-deps` (its
# declared dependencies pull a CUDA torch and GPU-only packages), then what its import
# needs, with numpy <= 2.2.6 (numba's ceiling), prometheus_client <= 0.24.1 and
# setuptools < 81 (LMCache still imports pkg_resources). Its CPU CacheGen kernels are in
# lmcache.v1.platform.torch_ops.cachegen_kernels (numba).
#
# Environment:
#   PYTHON       interpreter that creates the venv (default: python3)
#   TORCH_SPEC   torch requirement (default: the version pinned in constraints.txt)
#   TORCH_INDEX  index CPU torch comes from (default: PyTorch's CPU wheel index; set it
#                empty to use pip's configured index, e.g. a local wheel folder)
set -euo pipefail

if [[ $# -ne 1 || $1 == -* ]]; then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
dir=$1
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-$(grep -E '^torch==' "$here/constraints.txt" || echo torch)}
torch_index=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}

if [[ -e $dir && ! -x $dir/bin/python ]]; then
    echo "error: $dir exists and is not a virtualenv; give a new directory" >&2
    exit 1
fi
"$python" -m venv "$dir"
pip=("$dir/bin/python" -m pip install --disable-pip-version-check)

if [[ -n $torch_index ]]; then
    # --extra-index-url, not --index-url: PyPI still serves torch's own dependencies
    "${pip[@]}" --extra-index-url "$torch_index" "$torch_spec"
else
    "${pip[@]}" "$torch_spec"
fi
# Later installs must not replace the CPU torch (transformers and friends do not need
# another one, but a resolver may still prefer a newer release).
installed_torch=$("$dir/bin/python" -c 'import torch; print(torch.__version__)')
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
printf '%s\n' "torch==$installed_torch" "numpy<=2.2.6" "prometheus_client<=0.24.1" \
    "setuptools<81" >"$pins"

"${pip[@]}" -c "$pins" --no-deps "lmcache==0.5.6"
"${pip[@]}" -c "$pins" \
    numba "numpy<=2.2.6" "prometheus_client<=0.24.1" "setuptools<81" py-cpuinfo psutil \
    requests cachetools sortedcontainers aiofile msgspec pyzmq cryptography safetensors \
    aiohttp pyyaml transformers

"$dir/bin/python" - <<'EOF'
import lmcache
import lmcache.v1.cache_engine  # noqa: F401  the import the recipe promises
from lmcache.v1.platform.torch_ops import cachegen_kernels  # noqa: F401  numba CPU kernels
print(f"LMCache {getattr(lmcache, '__version__', '?')} imports; CPU CacheGen kernels found")
EOF
echo "done: kvcache bench codecs --lmcache-python $dir/bin/python"
