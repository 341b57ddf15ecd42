#!/usr/bin/env bash
# Installs the system packages Drover's build and tests need (Debian/Ubuntu, as root or with sudo):
# - librocksdb-dev: the `rocksdb` crate links against it instead of compiling RocksDB (26 min).
# - libclang-dev/clang: bindgen generates the RocksDB bindings.
# - postfix (smtp-sink, smtp-source), swaks, dnsmasq-base: real SMTP/DNS peers for tests and
#   benchmarks. Postfix is installed unconfigured, so nothing listens on port 25.
#   libnet-ssleay-perl: swaks's STARTTLS (only recommended by the swaks package).
# - redis-server: the cluster-wide limits' tests start their own (the package's service is not
#   used; tests never touch port 6379).
# - dkimpy and PyNaCl (PyPI, for the `python3` on PATH): an independent DKIM verifier for the
#   e2e tests, which skip that check when it is missing.
# - openapi-spec-validator (PyPI, brings jsonschema): validates docs/openapi.yaml and the replies
#   the e2e test gets against it (scripts/check-openapi.py); skipped when it is missing.
# - prometheus (for promtool), kubernetes-validate and pyyaml (PyPI): the deploy tests check
#   deploy/prometheus, deploy/grafana, deploy/kubernetes and deploy/docker-compose.yml with
#   them (skipped when missing, failing under CI=true).
set -euo pipefail
if command -v python3 >/dev/null && ! python3 -c "import dkim, nacl" 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check dkimpy pynacl 2>/dev/null \
    || echo "dkimpy not installed; the e2e DKIM test skips its external verifier" >&2
fi
if command -v python3 >/dev/null && ! python3 -c "import openapi_spec_validator, jsonschema" 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check openapi-spec-validator 2>/dev/null \
    || echo "openapi-spec-validator not installed; the e2e OpenAPI test skips its schema checks" >&2
fi
if command -v python3 >/dev/null && ! python3 -c "import kubernetes_validate, yaml" 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check kubernetes-validate pyyaml 2>/dev/null \
    || echo "kubernetes-validate not installed; the deploy tests skip the manifest checks" >&2
fi
packages=(librocksdb-dev libclang-dev clang pkg-config postfix swaks libnet-ssleay-perl dnsmasq-base prometheus redis-server chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing: ${missing[*]}" >&2
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
