#!/usr/bin/env bash
# Tools for loadtests/bench_overhead.py, installed once and cached under ~/.cache/lockgate:
#   - Debian's nginx (the bare reverse-proxy arm), its service left stopped and disabled;
#   - LiteLLM's proxy in its own virtualenv (the LiteLLM arm).
#
# `litellm[proxy]==1.110.2` does not resolve: its extra pins litellm-proxy==1.110.2,
# litellm-proxy-extras==0.4.114.post1 and litellm-enterprise==0.1.83.post1, which the index
# lacks (issue 6). So we install litellm==1.110.2, the proxy extra's *other* requirements read
# from the wheel's own metadata, and the two companion packages at versions that exist.
# Never 1.82.7, 1.82.8 or 1.107.0: those releases were compromised.
#
#   bash loadtests/overhead_setup.sh          # idempotent; re-running is a no-op
set -euo pipefail

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/lockgate"
VENV="$CACHE/litellm-venv"
LITELLM=1.110.2
PROXY_EXTRAS=0.4.110
ENTERPRISE=0.1.83
PYTHON="${PYTHON:-python3}"
mkdir -p "$CACHE"

install_nginx() {
  if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then
    return
  fi
  local as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo)
  # A policy-rc.d that answers 101 keeps the package's postinst from starting the service;
  # the benchmark runs its own nginx with a private config.
  local policy=/usr/sbin/policy-rc.d
  local own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee "$policy" >/dev/null
    "${as_root[@]}" chmod +x "$policy"
    own_policy=1
  fi
  echo "installing nginx (Debian package)"
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx \
    || { "${as_root[@]}" apt-get update -qq \
      && "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; }
  [ "$own_policy" -eq 0 ] || "${as_root[@]}" rm -f "$policy"
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    "${as_root[@]}" systemctl disable --now nginx >/dev/null 2>&1 || true
  fi
}

proxy_requirements() {
  # The `proxy` extra of the litellm wheel, minus the three pins that do not resolve.
  local wheel_dir="$CACHE/litellm-wheel"
  mkdir -p "$wheel_dir"
  "$VENV/bin/pip" download --quiet --no-deps --only-binary=:all: \
    -d "$wheel_dir" "litellm==$LITELLM" >&2
  "$VENV/bin/python" - "$wheel_dir"/litellm-"$LITELLM"-*.whl <<'EOF'
import sys
import zipfile

from packaging.requirements import Requirement

SKIP = {"litellm-proxy", "litellm-proxy-extras", "litellm-enterprise"}
with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = wheel.read(name).decode()
for line in metadata.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.marker is None or not req.marker.evaluate({"extra": "proxy"}):
        continue
    if req.marker.evaluate({"extra": ""}):
        continue  # a base requirement, not the extra's
    if req.name.lower().replace("_", "-") in SKIP:
        continue
    req.marker = None
    print(req)
EOF
}

install_litellm() {
  if "$VENV/bin/litellm" --version >/dev/null 2>&1; then
    return
  fi
  echo "installing LiteLLM proxy $LITELLM into $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip packaging
  local reqs
  mapfile -t reqs < <(proxy_requirements)
  echo "proxy extra requirements: ${reqs[*]}"
  "$VENV/bin/pip" install --quiet "litellm==$LITELLM" "${reqs[@]}" \
    "litellm-proxy-extras==$PROXY_EXTRAS" "litellm-enterprise==$ENTERPRISE"
}

install_nginx
install_litellm
echo "nginx: $(nginx -v 2>&1)"
echo "litellm: $(LITELLM_LOCAL_MODEL_COST_MAP=True "$VENV/bin/litellm" --version 2>&1 | grep -m 1 Version)"
