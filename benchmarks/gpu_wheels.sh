#!/usr/bin/env bash
# Downloads, here (where pip reaches PyPI), the wheels that benchmarks/gpu.sh needs on a GPU machine
# without a package registry, into .whl/ at the repository root (ignored by git: .gitignore).
#
#   bash benchmarks/gpu_wheels.sh        # then carry .whl to the GPU machine and run gpu.sh there
#
# The lent GPU machines' image (Python 3.12, x86-64) has torch with CUDA, torchvision, numpy, scipy,
# scikit-learn, pytest, transformers, matplotlib, tqdm, einops and packaging, but not curvlab's
# dependency backpack-for-pytorch nor its requirement unfoldNd, nor hessian-eigenthings (the
# optional comparison of bench_any_model and bench_scale). All three are pure-Python wheels; their
# other requirements are in the image (checked below against the wheels' metadata). The versions
# are the ones curvlab is developed against.
#
# On the GPU machine, gpu.sh installs every .whl/*.whl with
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
# and runs with PYTHONPATH=/tmp/site:<repository root> (no editable install, nothing fetched).
#
# Checks here: every requirement of the wheels (extras aside) is a wheel of .whl or in the image;
# no package has two wheels in .whl (two versions stop the install there); the wheels install
# into a scratch --target and backpack, unfoldNd and hessian_eigenthings import from it (with
# this checkout's .venv/bin/python, or python3, when it has torch). Exit status 0 when all pass.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
WANTED=(backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 hessian-eigenthings==1.0.0a5)
# the image's packages that the wheels require (KINDS.md's list of the 'cuda' image)
IN_IMAGE="torch torchvision numpy scipy einops packaging tqdm"
PIP=${PIP_PYTHON:-python3}

mkdir -p .whl
echo "== downloading ${WANTED[*]} into .whl (Python 3.12, manylinux x86-64)"
"$PIP" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${WANTED[@]}"

"$PIP" - "$IN_IMAGE" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


in_image = {norm(n) for n in sys.argv[1].split()}
wheels = sorted(Path(".whl").glob("*.whl"))
names: dict[str, list[str]] = {}
requires: dict[str, list[str]] = {}
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    name = norm(re.search(r"^Name: (.+)$", text, re.M).group(1).strip())
    names.setdefault(name, []).append(w.name)
    requires[name] = [
        norm(re.match(r"[A-Za-z0-9_.\-]+", r.strip()).group(0))
        for r in re.findall(r"^Requires-Dist: (.+)$", text, re.M)
        if not re.search(r";.*\bextra\s*==", r)
    ]
problems = []
for name, files in names.items():
    if len(files) > 1:
        problems.append(f"{name} has {len(files)} wheels in .whl ({', '.join(files)}): keep one")
for name, reqs in requires.items():
    for r in reqs:
        if r not in names and r not in in_image:
            problems.append(f"{name} requires {r}: neither in .whl nor in the image")
    print(f"   {name}: requires {', '.join(reqs) or 'nothing'}")
size = sum(w.stat().st_size for w in wheels)
print(f"== .whl: {len(wheels)} wheels, {size / 2**20:.2f} MiB")
if problems:
    print("\n".join("PROBLEM: " + p for p in problems))
    sys.exit(1)
EOF

# install into a scratch target and import from it (a Python with torch is needed for the import)
CHECK_PY=""
for c in .venv/bin/python python3; do
    if "$c" -c "import torch" 2>/dev/null; then
        CHECK_PY=$c
        break
    fi
done
if [[ -z $CHECK_PY ]]; then
    echo "== wheels downloaded; import check skipped (no Python with torch here)"
else
    SCRATCH=$(mktemp -d)
    trap 'rm -rf "$SCRATCH"' EXIT
    "$CHECK_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$SCRATCH" .whl/*.whl
    PYTHONPATH="$SCRATCH" "$CHECK_PY" - "$SCRATCH" <<'EOF'
import sys

import backpack
import hessian_eigenthings
import unfoldNd

for m in (backpack, unfoldNd, hessian_eigenthings):
    assert m.__file__.startswith(sys.argv[1]), f"{m.__name__} imported from {m.__file__}"
print("== backpack, unfoldNd and hessian_eigenthings import from the installed wheels")
EOF
fi
echo "== next: run benchmarks/gpu.sh on the GPU machine with .whl carried along (the device"
echo "   tool: carry [\".whl\"], command \"bash benchmarks/gpu.sh\")"
