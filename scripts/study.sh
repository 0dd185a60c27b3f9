#!/usr/bin/env bash
# The main job: a susceptibility study of the bundled default model on local Ray.
# Extra arguments are Hydra overrides, e.g. `scripts/study.sh sampler.nbeta=100` or `-m perturbation=a,b`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/python -m workflows.study "$@"
