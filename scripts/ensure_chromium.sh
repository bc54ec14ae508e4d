#!/bin/sh
# Make sure headless Chromium (Debian's `chromium` package) is installed; used by the report's browser test.
# Prints the browser's path and exits 0 when it is there (or was installed now).
# Exit 2: cannot install here (not root and no sudo, or no apt-get); exit 1: the install failed.
set -eu

for b in "${CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
    if [ -n "$b" ] && [ -x "$b" ]; then
        echo "$b"
        exit 0
    fi
done

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: apt-get is not available; install Chromium by hand (or set CHROMIUM=/path/to/chromium)" >&2
    exit 2
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "ensure_chromium: not root and no password-less sudo; cannot apt-get install chromium" >&2
    exit 2
fi

echo "ensure_chromium: installing Debian's chromium package (apt-get update, apt-get install -y chromium)" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >&2 || { echo "ensure_chromium: apt-get update failed" >&2; exit 1; }
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >&2 || {
    echo "ensure_chromium: apt-get install chromium failed" >&2
    exit 1
}
if [ -x /usr/bin/chromium ]; then
    echo /usr/bin/chromium
    exit 0
fi
echo "ensure_chromium: chromium installed but /usr/bin/chromium is missing" >&2
exit 1
