#!/usr/bin/env bash
# Install relayd from this checkout as a systemd service:
#   1. a venv under $RELAYD_PREFIX (default /opt/relayd) with this checkout pip-installed in it,
#   2. scripts/relayd.service -> $SYSTEMD_DIR/relayd.service (default /etc/systemd/system),
#   3. systemctl daemon-reload && systemctl enable --now relayd (only where systemd runs).
# Re-running upgrades in place; `systemctl restart relayd` runs the new code (a reload does not).
#
#   sudo scripts/install.sh            install, enable and start
#   scripts/install.sh --dry-run       print the steps, change nothing
# Environment: RELAYD_PREFIX, SYSTEMD_DIR, PYTHON (default python3; needs 3.11+).
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

dry_run=0
for arg in "$@"; do
    case "$arg" in
        --dry-run|-n) dry_run=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

checkout=$(cd "$(dirname "$0")/.." && pwd)
prefix=${RELAYD_PREFIX:-/opt/relayd}
unit_dir=${SYSTEMD_DIR:-/etc/systemd/system}
python=${PYTHON:-python3}
unit_src="$checkout/scripts/relayd.service"

step() {   # print a step; run it unless --dry-run
    printf '+ %s\n' "$*"
    if [ "$dry_run" = 0 ]; then
        "$@"
    fi
}

[ -f "$checkout/pyproject.toml" ] || { echo "install.sh: no pyproject.toml in $checkout" >&2; exit 1; }
[ -f "$unit_src" ] || { echo "install.sh: missing $unit_src" >&2; exit 1; }
if [ "$dry_run" = 0 ]; then
    command -v "$python" >/dev/null || { echo "install.sh: $python not found" >&2; exit 1; }
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || { echo "install.sh: relayd needs Python 3.11 or newer ($python)" >&2; exit 1; }
    [ "$(uname -m)" = x86_64 ] || { echo "install.sh: relayd runs on x86-64 only" >&2; exit 1; }
fi

# 1. The venv: a plain (non-editable) install, so the service does not depend on the checkout.
step mkdir -p "$prefix"
step "$python" -m venv "$prefix/venv"
step "$prefix/venv/bin/pip" install --quiet --upgrade pip
step "$prefix/venv/bin/pip" install --quiet "$checkout"

# 2. The unit, with ExecStart pointing into this prefix.
printf '+ sed s#/opt/relayd#%s#g %s > %s\n' "$prefix" "$unit_src" "$unit_dir/relayd.service"
if [ "$dry_run" = 0 ]; then
    mkdir -p "$unit_dir"
    sed "s#/opt/relayd#$prefix#g" "$unit_src" > "$unit_dir/relayd.service.tmp"
    chmod 0644 "$unit_dir/relayd.service.tmp"
    mv "$unit_dir/relayd.service.tmp" "$unit_dir/relayd.service"
fi

# 3. Start it, where systemd is the running init (a container may have systemctl without it).
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    step systemctl daemon-reload
    step systemctl enable --now relayd
    if [ "$dry_run" = 0 ]; then
        systemctl --no-pager --lines=5 status relayd || true
    fi
elif [ "$dry_run" = 1 ]; then
    step systemctl daemon-reload
    step systemctl enable --now relayd
    echo "install.sh: (systemd is not running here: a real run would skip these two)"
else
    echo "install.sh: systemd is not running here; on a systemd host run:"
    echo "  systemctl daemon-reload && systemctl enable --now relayd"
    echo "or start it by hand: $prefix/venv/bin/relayd --port 8080"
fi
if [ "$dry_run" = 1 ]; then
    echo "install.sh: dry run: nothing was changed"
fi
