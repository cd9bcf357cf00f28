#!/usr/bin/env bash
# Starts a moto server (S3 + Kinesis emulator) on 127.0.0.1:5000 unless something already answers there.
# Idempotent: safe to call before every test run. The venv lives under ~/.cache/wallaroo-connectors/venv-moto.
set -euo pipefail
. "$(dirname "$0")/lib/apt.sh"

MOTO_VERSION="${MOTO_VERSION:-5.2.5}"
HOST=127.0.0.1
PORT="${MOTO_PORT:-5000}"
CACHE="${HOME}/.cache/wallaroo-connectors"
VENV="${CACHE}/venv-moto"
LOG="${CACHE}/moto.log"

answers() {
  curl -s -o /dev/null --max-time 2 "http://${HOST}:${PORT}/moto-api/" 2>/dev/null \
    || python3 -c "import socket,sys; s=socket.socket(); s.settimeout(1); sys.exit(s.connect_ex(('${HOST}', ${PORT})))" 2>/dev/null
}

if answers; then
  echo "moto: already answering on ${HOST}:${PORT}"
  exit 0
fi

mkdir -p "${CACHE}"
if [ ! -x "${VENV}/bin/moto_server" ] || ! "${VENV}/bin/python" -c "import moto,sys; sys.exit(moto.__version__ != '${MOTO_VERSION}')" 2>/dev/null; then
  echo "moto: installing moto[server]==${MOTO_VERSION} into ${VENV}"
  if ! python3 -m venv "${VENV}" 2>/dev/null; then
    # Debian splits ensurepip out of python3.
    echo "moto: installing python3-venv"
    apt_install python3-venv
    rm -rf "${VENV}"
    python3 -m venv "${VENV}"
  fi
  "${VENV}/bin/pip" install --quiet --upgrade pip
  "${VENV}/bin/pip" install --quiet "moto[server]==${MOTO_VERSION}"
fi

echo "moto: starting on ${HOST}:${PORT} (log ${LOG})"
nohup "${VENV}/bin/moto_server" -H "${HOST}" -p "${PORT}" >"${LOG}" 2>&1 &
for _ in $(seq 1 120); do
  if answers; then
    echo "moto: ready"
    exit 0
  fi
  sleep 0.5
done
echo "moto: did not answer on ${HOST}:${PORT} within 60 s; see ${LOG}" >&2
tail -n 30 "${LOG}" >&2 || true
exit 1
