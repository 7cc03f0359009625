#!/usr/bin/env bash
# Fill the two ignored folders that bench/gpu_check.sh needs on a GPU machine without network:
#   .gpu-wheels/  wheels the GPU image lacks (for its Python 3.12, manylinux x86_64; see
#                 /work/.library/device/*.md: it has torch, transformers, peft, accelerate, pandas,
#                 jinja2, typer, rich, statsmodels, scipy, scikit-learn, matplotlib, markdown-it-py)
#   .gpu-data/    the real task data (data/) and the embedded model's config + tokenizer, without
#                 its weights (smollm2/): the GGUF is 94 MB, over what a device run can carry, so
#                 the GPU check builds random weights of that architecture there.
# Run from anywhere on this machine; then carry both folders (run(carry=[".gpu-wheels", ".gpu-data"])).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA=${FEWTUNE_DATA_DIR:-../shared/data}
GPU_PY=${GPU_PYTHON_VERSION:-3.12}
# The project's dependencies missing from the GPU image, with their own missing dependencies.
WHEELS=(pydantic pydantic-core annotated-types typing-inspection typing-extensions pooch platformdirs gguf)

rm -rf .gpu-wheels .gpu-data
mkdir -p .gpu-wheels .gpu-data/smollm2
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest .gpu-wheels \
  --python-version "$GPU_PY" --implementation cp --abi "cp${GPU_PY/./}" --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any "${WHEELS[@]}"
cp -r "$DATA" .gpu-data/data
"$PY" - <<'PY'
import shutil
from pathlib import Path

from fewtune.models.loading import embedded_model_dir

src = embedded_model_dir()
for f in src.iterdir():
    if f.suffix != ".safetensors":
        shutil.copy2(f, Path(".gpu-data/smollm2") / f.name)
PY
du -sh .gpu-wheels .gpu-data
