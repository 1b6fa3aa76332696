#!/usr/bin/env bash
# Install the fieldgate edge agent (or, with --broker, the cloud broker) as a systemd service.
# Idempotent: run it again to upgrade; an existing config is never overwritten. See --help.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: install.sh [--broker] [--root DIR] [--no-venv] [--start] [--python PY] [WHEEL]

Installs the edge agent (default) or the cloud broker as a systemd service:
  /opt/NAME/venv                    its own virtual environment with this checkout (or WHEEL) installed
  /etc/systemd/system/NAME.service  the unit (Type=notify, watchdog, hardening)
  /etc/sysusers.d/NAME.conf         the system user NAME (the agent's is also in group dialout)
  /etc/tmpfiles.d/NAME.conf         /var/lib/NAME, and the config's owner and mode
  /etc/NAME/CONFIG                  an example config, only if none exists (agent.toml / broker.toml)
then creates the user and directories, reloads systemd and enables the unit. NAME is edge-agent or
cloud-broker.

Options:
  --broker      install the cloud broker instead of the edge agent
  --root DIR    install into DIR as the root of a staged system (image build, packaging, tests): files
                only, enabled offline with `systemctl --root`; users and directories are created by
                systemd-sysusers/-tmpfiles at the target's first boot. The venv (unless --no-venv) is
                built at DIR/opt/NAME/venv, but holds absolute paths: it only works once DIR is `/`.
  --no-venv     do not create or update the virtual environment
  --start       (re)start the service after installing (not with --root)
  --python PY   interpreter for the venv (default: python3; needs >= 3.11)
  WHEEL         a fieldgate wheel to install instead of this checkout
  -h, --help    show this help

pip honours its usual environment (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX) for offline installs.
Exit status: 0 installed, 2 bad usage, 1 anything else failed.
EOF
}

die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
say() { printf 'install.sh: %s\n' "$*" >&2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(dirname "$HERE")
NAME=edge-agent
CONFIG=agent.toml
ROOT=
VENV=1
START=0
PYTHON=python3
SOURCE=

while (($#)); do
    case "$1" in
        --broker) NAME=cloud-broker; CONFIG=broker.toml ;;
        --root)
            (($# >= 2)) || { usage >&2; exit 2; }
            ROOT=$2; shift ;;
        --root=*) ROOT=${1#--root=} ;;
        --no-venv) VENV=0 ;;
        --start) START=1 ;;
        --python)
            (($# >= 2)) || { usage >&2; exit 2; }
            PYTHON=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) printf 'install.sh: unknown option %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
        *)
            [[ -z $SOURCE ]] || { printf 'install.sh: only one WHEEL\n' >&2; exit 2; }
            SOURCE=$1 ;;
    esac
    shift
done

if [[ -n $ROOT ]]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    [[ $ROOT != / ]] || ROOT=
fi
if [[ -n $ROOT && $START == 1 ]]; then
    printf 'install.sh: --start cannot start a service in a staged root\n' >&2; exit 2
fi
if [[ -z $ROOT && $(id -u) -ne 0 ]]; then
    die "run as root (or stage into a directory with --root DIR)"
fi
if [[ -n $SOURCE ]]; then
    [[ -f $SOURCE ]] || die "no such wheel: $SOURCE"
    SOURCE=$(cd "$(dirname "$SOURCE")" && pwd)/$(basename "$SOURCE")
else
    SOURCE=$CHECKOUT
fi

OPT=$ROOT/opt/$NAME
UNIT_DIR=$ROOT/etc/systemd/system
CONF_DIR=$ROOT/etc/$NAME

# 1. The venv: its own interpreter environment, so upgrades never touch the system Python.
if ((VENV)); then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is older than 3.11 (or missing); pass --python"
    if [[ ! -x $OPT/venv/bin/python ]]; then
        say "creating $OPT/venv"
        mkdir -p "$OPT"
        "$PYTHON" -m venv "$OPT/venv"
    fi
    say "installing $SOURCE into $OPT/venv"
    "$OPT/venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$SOURCE"
    [[ -x $OPT/venv/bin/$NAME ]] || die "$OPT/venv/bin/$NAME missing after pip install"
fi

# 2. Unit, user and directory declarations. /etc, not /usr/lib: this is a local install, not a package.
install -d -m 0755 "$UNIT_DIR" "$ROOT/etc/sysusers.d" "$ROOT/etc/tmpfiles.d" "$CONF_DIR"
install -m 0644 "$HERE/$NAME.service" "$UNIT_DIR/$NAME.service"
install -m 0644 "$HERE/sysusers.d/$NAME.conf" "$ROOT/etc/sysusers.d/$NAME.conf"
install -m 0644 "$HERE/tmpfiles.d/$NAME.conf" "$ROOT/etc/tmpfiles.d/$NAME.conf"

# 3. An example config, never over an existing one (it is the operator's, or was pushed and persisted).
if [[ ! -e $CONF_DIR/$CONFIG ]]; then
    say "installing example config $CONF_DIR/$CONFIG: edit it before starting"
    install -m 0640 "$HERE/examples/$CONFIG" "$CONF_DIR/$CONFIG"
else
    say "keeping existing config $CONF_DIR/$CONFIG"
fi

# 4. Users, directories, enablement.
if [[ -n $ROOT ]]; then
    if command -v systemctl >/dev/null 2>&1; then
        systemctl --root="$ROOT" --quiet enable "$NAME.service"
    else
        install -d -m 0755 "$UNIT_DIR/multi-user.target.wants"
        ln -sfn "/etc/systemd/system/$NAME.service" "$UNIT_DIR/multi-user.target.wants/$NAME.service"
    fi
    say "staged $NAME in $ROOT (users and directories are created at its first boot)"
    exit 0
fi

systemd-sysusers "/etc/sysusers.d/$NAME.conf"
systemd-tmpfiles --create "/etc/tmpfiles.d/$NAME.conf"
if ((VENV)) && [[ $NAME == edge-agent ]]; then
    # Exit 78 means the config is invalid; the unit would refuse to restart on it, so say it now.
    "$OPT/venv/bin/edge-agent" check --config "$CONF_DIR/$CONFIG" >&2 \
        || say "WARNING: $CONF_DIR/$CONFIG does not validate; fix it before starting $NAME"
fi
if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    systemctl enable --quiet "$NAME.service"
    if ((START)); then
        systemctl restart "$NAME.service"
        say "started $NAME; follow it with: journalctl -u $NAME -f"
    else
        say "enabled $NAME; start it with: systemctl start $NAME"
    fi
else
    # Not booted with systemd (a container, a chroot): enable offline; nothing to reload or start.
    systemctl --quiet enable "$NAME.service"
    ((START == 0)) || die "systemd is not running here; cannot start $NAME"
    say "enabled $NAME (systemd is not running here; it starts at the next boot)"
fi
