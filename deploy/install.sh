#!/usr/bin/env bash
# Install binner as a systemd service on this machine. Idempotent: run it again to upgrade.
#
#   sudo deploy/install.sh
#   deploy/install.sh --print-unit | --print-config    preview what would be installed (no root needed)
#
# What it does: creates the system user and group, the input/output directories and /etc/binner, a virtual
# environment in $PREFIX/venv with torch first and then binner from this repository (versions pinned by
# constraints.txt), installs the systemd unit and, only when none exists yet, /etc/binner/binner.yaml.
#
# Options (environment variables):
#   PREFIX=/opt/binner              where the virtual environment (and a copy of docs/) goes
#   BINNER_USER=binner              system user and group the service runs as
#   INPUT_DIR=/srv/binner/inbox     watched directory (written into the unit's ReadWritePaths= and a new config)
#   OUTPUT_DIR=/srv/binner/bins     bins directory (idem)
#   GPU=auto                        auto: CUDA torch when `nvidia-smi -L` lists a GPU, else the CPU build;
#                                   1 / 0 force either
#   TORCH_INDEX_URL=                pip index for torch and torchvision; default on GPU hosts
#                                   https://download.pytorch.org/whl/cu128 (both from it, so they match), empty
#                                   on CPU hosts (PyPI's default build)
#   TORCH_SPEC=torch==2.13.0        the torch requirement installed first
#   TORCHVISION_SPEC=torchvision==0.28.0  installed with torch from the same index on GPU hosts
#   BINNER_EXTRAS=                  optional extras of binner, e.g. "paddle" (OCR on CUDA needs none: it runs
#                                   the torch runtime, ocr.runtime auto)
#   PYTHON=python3                  interpreter for the virtual environment (3.11 or newer)
set -euo pipefail
umask 022

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${PREFIX:-/opt/binner}"
BINNER_USER="${BINNER_USER:-binner}"
INPUT_DIR="${INPUT_DIR:-/srv/binner/inbox}"
OUTPUT_DIR="${OUTPUT_DIR:-/srv/binner/bins}"
GPU="${GPU:-auto}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCHVISION_SPEC="${TORCHVISION_SPEC:-torchvision==0.28.0}"
case "$GPU" in
    auto) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; else GPU=0; fi ;;
    0|1) ;;
    *) printf 'install.sh: error: GPU must be auto, 0 or 1 (got %s)\n' "$GPU" >&2; exit 1 ;;
esac
if [ "$GPU" = 1 ]; then
    TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cu128}"
else
    TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
fi
BINNER_EXTRAS="${BINNER_EXTRAS:-}"
PYTHON="${PYTHON:-python3}"
CONFIG_DIR=/etc/binner
CONFIG="$CONFIG_DIR/binner.yaml"
ENV_FILE="$CONFIG_DIR/binner.env"
UNIT_DEST=/etc/systemd/system/binner.service
STATE_DIR=/var/lib/binner
CACHE_DIR=/var/cache/binner

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

# --- checks ---------------------------------------------------------------------------------------------------
[ -f "$REPO/pyproject.toml" ] || die "$REPO does not look like the binner repository (no pyproject.toml)"
[ -f "$REPO/constraints.txt" ] || die "$REPO/constraints.txt is missing: it pins the tested versions"
for path in "$PREFIX" "$INPUT_DIR" "$OUTPUT_DIR"; do
    case "$path" in
        /*) ;;
        *) die "'$path' must be an absolute path" ;;
    esac
    case "$path" in
        *[[:space:]\|\&\\]*) die "'$path' contains a space or one of | & \\: pick a plain path" ;;
    esac
done
case "$OUTPUT_DIR/" in
    "$INPUT_DIR"/*) die "OUTPUT_DIR ($OUTPUT_DIR) must not be inside INPUT_DIR ($INPUT_DIR)" ;;
esac
for path in "$INPUT_DIR" "$OUTPUT_DIR"; do
    case "$path/" in
        /home/*|/root/*|/run/user/*) die "'$path' is under a home directory, which the unit hides (ProtectHome=yes)" ;;
    esac
done
[[ "$BINNER_USER" =~ ^[a-z_][a-z0-9_-]*$ ]] || die "BINNER_USER '$BINNER_USER' is not a valid user name"

# The unit may write only below one directory holding both input and output: every ReadWritePaths= entry is
# a separate bind mount, and rename(2)/link(2) between two mounts fail (EXDEV), so `move` would copy.
common_parent() {
    local a="$1/" b="$2/" prefix=""
    while [ -n "$a" ] && [ "${a%%/*}" = "${b%%/*}" ]; do
        prefix="$prefix${a%%/*}/"
        a="${a#*/}"
        b="${b#*/}"
    done
    prefix="${prefix%/}"
    printf '%s\n' "${prefix:-/}"
}
RW_PATHS="$(common_parent "$INPUT_DIR" "$OUTPUT_DIR")"
if [ "$RW_PATHS" = "/" ]; then
    RW_PATHS="$INPUT_DIR $OUTPUT_DIR"
    printf 'warning: %s and %s share no parent directory: the service sees them as two mounts, so\n' "$INPUT_DIR" "$OUTPUT_DIR" >&2
    printf '         placement "move" and "hardlink" will copy; put both under one directory to avoid that\n' >&2
fi

render_unit() {
    sed -e "s|/opt/binner|$PREFIX|g" \
        -e "s|^ReadWritePaths=.*|ReadWritePaths=$RW_PATHS|" \
        -e "s|^User=.*|User=$BINNER_USER|" \
        -e "s|^Group=.*|Group=$BINNER_USER|" \
        "$REPO/deploy/systemd/binner.service"
}

render_config() {
    sed -e "s|^input: .*|input: $INPUT_DIR|" -e "s|^output: .*|output: $OUTPUT_DIR|" "$REPO/deploy/binner.yaml"
}

case "${1:-}" in
    --print-unit) render_unit; exit 0 ;;
    --print-config) render_config; exit 0 ;;
    "") ;;
    *) die "unknown argument '$1' (options are environment variables; see the top of $0)" ;;
esac

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0): it creates a system user, directories and a systemd unit"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install Python 3.11+ (Debian/Ubuntu: apt-get install python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); binner needs Python 3.11 or newer (set PYTHON=python3.11)"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
    || die "$PYTHON lacks the venv module (Debian/Ubuntu: apt-get install python3-venv)"

# --- user and group -------------------------------------------------------------------------------------------
NOLOGIN="$(command -v nologin || true)"
[ -n "$NOLOGIN" ] || NOLOGIN=/usr/sbin/nologin
if ! getent group "$BINNER_USER" >/dev/null; then
    say "creating system group $BINNER_USER"
    groupadd --system "$BINNER_USER"
fi
if ! getent passwd "$BINNER_USER" >/dev/null; then
    say "creating system user $BINNER_USER (no login shell, home $STATE_DIR)"
    useradd --system --gid "$BINNER_USER" --home-dir "$STATE_DIR" --no-create-home \
        --shell "$NOLOGIN" --comment "binner image sorting service" "$BINNER_USER"
fi
# GPU nodes: distributions that restrict /dev/nvidia* or /dev/dri to a group use video or render.
for gpu_group in video render; do
    if getent group "$gpu_group" >/dev/null && ! id -nG "$BINNER_USER" | tr ' ' '\n' | grep -qx "$gpu_group"; then
        say "adding $BINNER_USER to group $gpu_group (GPU device access)"
        usermod -aG "$gpu_group" "$BINNER_USER"
    fi
done

# --- directories ----------------------------------------------------------------------------------------------
# Input and output: owned by the service, group-writable and setgid so that members of group $BINNER_USER
# (uploaders, consumers) can drop files in and take results out. Existing directories are left as they are.
for dir in "$INPUT_DIR" "$OUTPUT_DIR"; do
    if [ ! -d "$dir" ]; then
        say "creating $dir"
        install -d -o "$BINNER_USER" -g "$BINNER_USER" -m 2770 "$dir"
    elif command -v runuser >/dev/null && ! runuser -u "$BINNER_USER" -- test -w "$dir" -a -x "$dir"; then
        printf 'warning: %s exists but user %s cannot write to it; fix its owner or mode\n' "$dir" "$BINNER_USER" >&2
    fi
done
install -d -o root -g root -m 0755 "$CONFIG_DIR"
# systemd creates these at start too (StateDirectory=, CacheDirectory=); made here so that
# `binner fetch-weights` can fill the cache before the first start.
for dir in "$STATE_DIR" "$CACHE_DIR"; do
    [ -d "$dir" ] || install -d -o "$BINNER_USER" -g "$BINNER_USER" -m 0750 "$dir"
done

# --- virtual environment --------------------------------------------------------------------------------------
install -d -o root -g root -m 0755 "$PREFIX"
if [ ! -x "$PREFIX/venv/bin/python" ]; then
    say "creating virtual environment $PREFIX/venv"
    "$PYTHON" -m venv "$PREFIX/venv"
fi
PIP=("$PREFIX/venv/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip
# torch first and alone: its index decides CPU or CUDA; constraints.txt then keeps pip from swapping it. On a
# GPU host torchvision comes from the same index, so that its compiled operators match torch's CUDA build.
TORCH_BUILD="$("$PREFIX/venv/bin/python" -c 'import torch; print("cuda" if torch.version.cuda else "cpu")' 2>/dev/null || true)"
WANT_BUILD=cpu
[ "$GPU" = 1 ] && WANT_BUILD=cuda
if [ -n "$TORCH_BUILD" ] && [ "$TORCH_BUILD" != "$WANT_BUILD" ]; then
    say "replacing the $TORCH_BUILD build of torch with the $WANT_BUILD build"
    "${PIP[@]}" uninstall --quiet -y torch torchvision
fi
TORCH_REQS=("$TORCH_SPEC")
[ "$GPU" = 1 ] && TORCH_REQS+=("$TORCHVISION_SPEC")
if [ -n "$TORCH_INDEX_URL" ]; then
    say "installing ${TORCH_REQS[*]} ($WANT_BUILD build) from $TORCH_INDEX_URL"
    "${PIP[@]}" install --index-url "$TORCH_INDEX_URL" "${TORCH_REQS[@]}"
else
    say "installing ${TORCH_REQS[*]} ($WANT_BUILD build)"
    "${PIP[@]}" install "${TORCH_REQS[@]}"
fi
# Build from a copy: pip builds a source tree in place (build/, *.egg-info) and the checkout stays clean.
src_copy="$(mktemp -d)"
trap 'rm -rf "$src_copy"' EXIT
tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude=./inbox --exclude=./bins --exclude=./.binner --exclude=./.pytest_cache --exclude=./.ruff_cache -cf - . \
    | tar -C "$src_copy" -xf -
TARGET="$src_copy"
[ -z "$BINNER_EXTRAS" ] || TARGET="${src_copy}[${BINNER_EXTRAS}]"
say "installing binner from $REPO"
"${PIP[@]}" install -c "$REPO/constraints.txt" "$TARGET"
"$PREFIX/venv/bin/binner" version >/dev/null || die "$PREFIX/venv/bin/binner does not run; see the pip output above"
if [ -d "$REPO/docs" ]; then
    install -d -m 0755 "$PREFIX/docs"
    cp -R "$REPO/docs/." "$PREFIX/docs/"
fi

# --- systemd unit (always refreshed: local changes belong in drop-ins, `systemctl edit binner`) -------------
say "installing $UNIT_DEST"
unit_tmp="$(mktemp)"
trap 'rm -rf "$src_copy" "$unit_tmp"' EXIT
render_unit >"$unit_tmp"
install -m 0644 -o root -g root "$unit_tmp" "$UNIT_DEST"

# --- configuration (never overwritten) ------------------------------------------------------------------------
if [ -e "$CONFIG" ]; then
    say "keeping existing $CONFIG (the shipped one is $REPO/deploy/binner.yaml)"
    if ! grep -qE "^input: *$INPUT_DIR *$" "$CONFIG" || ! grep -qE "^output: *$OUTPUT_DIR *$" "$CONFIG"; then
        printf 'warning: input/output in %s differ from INPUT_DIR=%s OUTPUT_DIR=%s;\n' "$CONFIG" "$INPUT_DIR" "$OUTPUT_DIR" >&2
        printf '         the unit only lets the service write to the latter (ReadWritePaths=)\n' >&2
    fi
else
    say "installing $CONFIG"
    render_config >"$unit_tmp"
    install -m 0640 -o root -g "$BINNER_USER" "$unit_tmp" "$CONFIG"
fi
if [ ! -e "$ENV_FILE" ]; then
    say "installing $ENV_FILE"
    cat >"$unit_tmp" <<'EOF'
# Environment for binner.service (KEY=value lines). Examples:
# CUDA_VISIBLE_DEVICES=0,1
# BINNER_OCR__DEVICES=cuda:0
# BINNER_VISION__DEVICES=cuda:1
# BINNER_LOG__LEVEL=debug
EOF
    install -m 0640 -o root -g "$BINNER_USER" "$unit_tmp" "$ENV_FILE"
fi
# Validation only (keys, values); `binner config check` also wants the weights, which come later (step 2).
if ! config_problem="$("$PREFIX/venv/bin/binner" config show --config "$CONFIG" 2>&1 >/dev/null)"; then
    printf 'warning: %s is not valid; fix it before starting:\n%s\n' "$CONFIG" "$config_problem" >&2
fi

# --- systemd --------------------------------------------------------------------------------------------------
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if systemctl is-active --quiet binner.service; then
        say "binner is running the previous version: systemctl restart binner"
    fi
else
    say "systemd is not running here: the unit is installed but not loaded"
fi

cat <<EOF

binner is installed.
  venv:    $PREFIX/venv        unit: $UNIT_DEST        config: $CONFIG   (environment: $ENV_FILE)
  input:   $INPUT_DIR     output: $OUTPUT_DIR     state: $STATE_DIR     weights cache: $CACHE_DIR

Next steps:
  1. Review $CONFIG (devices, batch sizes, thresholds); GPUs: CUDA_VISIBLE_DEVICES in $ENV_FILE.
  2. Fetch the public weights once (needs internet), as the service user:
       sudo -u $BINNER_USER HOME=$STATE_DIR XDG_CACHE_HOME=$CACHE_DIR HF_HOME=$CACHE_DIR/huggingface \\
            TORCH_HOME=$CACHE_DIR/torch $PREFIX/venv/bin/binner fetch-weights --config $CONFIG
     (offline: point the model keys of $CONFIG at local copies; see $REPO/deploy/examples/)
  3. sudo systemctl enable --now binner
  4. systemctl status binner;  journalctl -u binner -f;  curl -s http://127.0.0.1:9108/metrics | head
  5. Let users drop images: sudo usermod -aG $BINNER_USER USER  (inbox and bins are group-writable)
  6. Monitoring: $REPO/deploy/prometheus/ (scrape config, alerts) and $REPO/grafana/binner.json (dashboard).
EOF
