#!/usr/bin/env bash
# Install the Debian packages named as arguments, only those not installed yet (needs root or sudo).
# Where there is no apt (macOS, Fedora, Arch, ...) nothing is installed: the script says what the
# packages are for and what to install instead, and set-up goes on (only 3D rendering needs them).
set -euo pipefail
if ! command -v dpkg >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "no apt on this machine: not installing $*" >&2
  echo "  libosmesa6 is OSMesa, the CPU OpenGL the objaverse source renders with. Install it with your" >&2
  echo "  package manager (Fedora: dnf install mesa-libOSMesa; Arch: pacman -S mesa; macOS: brew install mesa)," >&2
  echo "  or render on a GPU with PYOPENGL_PLATFORM=egl. Every other source and the tests that need no renderer work without it." >&2
  exit 0
fi
missing=()
for pkg in "$@"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing Debian packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
