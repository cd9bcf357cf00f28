# shellcheck shell=bash
# Sourced (not run) by scripts/test.sh and tests/services/*.sh: installs Debian packages that are missing.
#   apt_install PKG...   installs those of PKG that dpkg does not know as installed; no-op when all are there.
# `apt-get update` runs at most once per run of the scripts: it is skipped while apt's package lists are fresher
# than 6 hours (a fresh machine has none, so the first caller updates; every later caller reuses the lists).
# If an install still fails (a list newer than the check but already stale on the mirror), update once and retry.

apt_lists_fresh() {
  [ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -360 -print -quit 2>/dev/null)" ]
}

apt_update_once() {
  if ! apt_lists_fresh; then
    echo "apt: apt-get update"
    apt-get update -qq -o DPkg::Lock::Timeout=300
  fi
}

apt_install() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  echo "apt: installing ${missing[*]}"
  apt_update_once
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${missing[@]}" >/dev/null; then
    apt-get update -qq -o DPkg::Lock::Timeout=300
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
