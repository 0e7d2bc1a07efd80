# Shared by the local scripts (source it): make sure the tools a script uses are there.
#
#   need COMMAND:PACKAGE[,PACKAGE]...   every missing COMMAND is installed with apt-get when running
#                                       as root; otherwise the exact apt-get command is printed and
#                                       the script stops. COMMAND is a name on PATH, an absolute
#                                       path, or `pip` (python3's pip module, which Debian's python3
#                                       lacks).
#   apt_install PACKAGE...              apt-get install as root (updating the lists if needed).
#   need_cargo                          stops with the rustup command when cargo is missing.
#
# Progress and errors go to stderr, prefixed with $NEED_TAG (default "setup").

_need_has() {
  case "$1" in
    pip) python3 -m pip --version >/dev/null 2>&1 ;;
    /*) [ -x "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

need() {
  local spec missing=() packages=()
  for spec in "$@"; do
    _need_has "${spec%%:*}" && continue
    missing+=("${spec%%:*}")
    # shellcheck disable=SC2206
    packages+=(${spec#*:})
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  packages=("${packages[@]//,/ }")
  # shellcheck disable=SC2206
  packages=(${packages[*]})
  local tag=${NEED_TAG:-setup}
  if [ "$(id -u)" != 0 ]; then
    printf '[%s] error: missing %s; install with:\n  sudo apt-get install %s\n' \
      "$tag" "${missing[*]}" "${packages[*]}" >&2
    return 1
  fi
  printf '[%s] missing %s: installing %s with apt-get\n' "$tag" "${missing[*]}" "${packages[*]}" >&2
  apt_install "${packages[@]}" || return 1
  for spec in "$@"; do
    _need_has "${spec%%:*}" \
      || { printf '[%s] error: %s still missing after installing its package\n' "$tag" "${spec%%:*}" >&2; return 1; }
  done
}

# apt_install PACKAGE...: as root, non-interactive, without recommended extras.
apt_install() {
  # A fresh image has no package lists; update only when the install cannot find a package.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
    || { apt-get update -qq >&2 \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; } \
    || { printf '[%s] error: apt-get install %s failed\n' "${NEED_TAG:-setup}" "$*" >&2; return 1; }
}

need_cargo() {
  command -v cargo >/dev/null 2>&1 && return 0
  printf '[%s] error: cargo not found. Install Rust with rustup (the version is pinned in rust-toolchain.toml):\n  curl --proto =https --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y && . "$HOME/.cargo/env"\n' \
    "${NEED_TAG:-setup}" >&2
  return 1
}
