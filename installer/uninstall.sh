#!/usr/bin/env bash
# Remove what installer/install.sh installed. Data (PREFIX/var/lib/infernode: models,
# database, logs) is kept unless --purge; the config and admin key are moved into it
# (data_dir/config-saved), so the installer finds and restores them on a reinstall.
# install.sh also copies this script to PREFIX/opt/infernode/uninstall.sh.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: uninstall.sh [--user] [--prefix DIR] [--no-systemd] [--purge]
  --user        undo an install.sh --user (default prefix $HOME/.local, user unit)
  --prefix DIR  the prefix install.sh was given
  --no-systemd  do not touch systemd (install.sh --no-systemd)
  --purge       also delete the data directory, the config and the infernode system user
EOF
}
say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

PREFIX_SET=0 PREFIX="" USER_MODE=0 NO_SYSTEMD=0 PURGE=0 SERVICE_USER=infernode
while [ $# -gt 0 ]; do
    case "$1" in
        --user) USER_MODE=1 ;;
        --prefix) PREFIX="${2:?--prefix needs a directory}"; PREFIX_SET=1; shift ;;
        --prefix=*) PREFIX="${1#*=}"; PREFIX_SET=1 ;;
        --no-systemd) NO_SYSTEMD=1 ;;
        --purge) PURGE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
    shift
done
if [ "$USER_MODE" = 1 ] && [ "$PREFIX_SET" = 0 ]; then PREFIX="$HOME/.local"; fi
PREFIX="${PREFIX%/}"
case "$PREFIX" in ""|/*) ;; *) PREFIX="$(pwd)/$PREFIX" ;; esac
OPT="$PREFIX/opt/infernode"
ETC="$PREFIX/etc/infernode"
DATA="$PREFIX/var/lib/infernode"
if [ "$USER_MODE" = 1 ]; then
    BIN_DIR="$PREFIX/bin" UNIT_DIR="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user" SYSTEMCTL=(systemctl --user)
else
    BIN_DIR="$PREFIX/usr/local/bin" UNIT_DIR="$PREFIX/etc/systemd/system" SYSTEMCTL=(systemctl)
    [ "$(id -u)" = 0 ] || die "run as root (sudo $0 ...), or pass --user for a --user install"
fi
[ -e "$OPT" ] || [ -e "$ETC" ] || [ -e "$DATA" ] || die "no Infernode installed under ${PREFIX:-/} (wrong --prefix or --user?)"

# -- stop the service; refuse while any node still runs on this data -----------------------
if [ "$NO_SYSTEMD" = 0 ] && [ -e "$UNIT_DIR/infernode.service" ]; then
    if [ -d /run/systemd/system ] && { [ -z "$PREFIX" ] || [ "$USER_MODE" = 1 ]; }; then
        say "stopping and disabling infernode.service (the node stops its workers)"
        "${SYSTEMCTL[@]}" disable --now infernode.service >/dev/null 2>&1 || true
    fi
    rm -f "$UNIT_DIR/infernode.service"
    if [ -d /run/systemd/system ] && { [ -z "$PREFIX" ] || [ "$USER_MODE" = 1 ]; }; then "${SYSTEMCTL[@]}" daemon-reload; fi
fi
if [ -e "$DATA/run/node.lock" ] && ! flock -n "$DATA/run/node.lock" true; then
    die "a node is still running on $DATA (pid $(cat "$DATA/run/node.lock" 2>/dev/null)); stop it first (SIGTERM stops its workers too)"
fi

# -- the program ---------------------------------------------------------------------------
if [ -f "$BIN_DIR/infernode" ] && grep -q "installed by Infernode's install.sh" "$BIN_DIR/infernode"; then
    rm -f "$BIN_DIR/infernode"
fi
rm -rf "$OPT"
say "removed $OPT"

# -- config and data -----------------------------------------------------------------------
if [ "$PURGE" = 1 ]; then
    rm -rf "$ETC" "$DATA"
    say "purged $ETC and $DATA"
    if [ "$USER_MODE" = 0 ] && [ -z "$PREFIX" ] && id "$SERVICE_USER" >/dev/null 2>&1; then
        userdel "$SERVICE_USER" && say "removed system user $SERVICE_USER"
    fi
else
    if [ -d "$ETC" ]; then
        # The config and admin key are worth keeping: park them with the data.
        mkdir -p "$DATA/config-saved"
        cp -a "$ETC/." "$DATA/config-saved/" && rm -rf "$ETC"
        say "moved $ETC to $DATA/config-saved (install.sh restores it)"
    fi
    say "kept $DATA (uninstall.sh --purge deletes it)"
fi
# Folders the installer may have created under a private prefix, if now empty.
if [ -n "$PREFIX" ]; then
    for d in "$PREFIX/opt" "$PREFIX/etc/systemd/system" "$PREFIX/etc/systemd" "$PREFIX/etc" "$BIN_DIR" \
             "$PREFIX/usr/local" "$PREFIX/usr" "$PREFIX/var/lib" "$PREFIX/var"; do
        rmdir "$d" 2>/dev/null || true
    done
fi
say "Infernode uninstalled"
