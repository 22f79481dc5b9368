# Shared by scripts/test, scripts/run-local and scripts/bench: installs what a fresh
# machine lacks and starts/stops the test broker. Source it; do not run it.

# Caches live outside the clone so that a new clone (CI) reuses them; both are safe to
# delete (they are rebuilt, which takes minutes). The checkout's `target` is a link to the
# cache's build directory, so plain `cargo build` / `cargo test` in the checkout and the
# scripts share one target directory. A `target` that is already there (a directory, or
# a link elsewhere) is used as it is; CARGO_TARGET_DIR overrides both.
S2S_CACHE="${S2S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/s2s-postback}"
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  if [ ! -e target ] && [ ! -L target ]; then
    mkdir -p "$S2S_CACHE/target"
    ln -s "$S2S_CACHE/target" target
  fi
  CARGO_TARGET_DIR="$PWD/target"
fi
export CARGO_TARGET_DIR
TANSU_VERSION=0.6.0
TANSU_ROOT="$S2S_CACHE/tansu-$TANSU_VERSION"
TANSU_BIN="$TANSU_ROOT/bin/tansu"

# Each step's line says when it began, in seconds since the script started.
log() { printf '\033[1m==> [%ds] %s\033[0m\n' "$SECONDS" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The shared build directory only grows: every changed crate leaves its former artifacts
# and incremental data behind, and once the disk is full the linker dies of a bus error
# in the middle of a build. Below S2S_MIN_FREE_GIB (15) free on its filesystem, the
# incremental data goes first, then, if that is not enough and the directory is this
# cache's, the whole directory (rebuilt from scratch, RocksDB and librdkafka included).
ensure_disk_space() {
  local want=$(( ${S2S_MIN_FREE_GIB:-15} * 1024 * 1024 )) dir
  dir=$(readlink -f "$CARGO_TARGET_DIR")
  mkdir -p "$dir"
  free_kib() { df -Pk "$dir" | awk 'NR == 2 { print $4 }'; }
  [ "$(free_kib)" -ge "$want" ] && return 0
  log "less than ${S2S_MIN_FREE_GIB:-15} GiB free for $dir: removing its incremental build data"
  find "$dir" -maxdepth 3 -type d -name incremental -prune -exec rm -rf {} +
  [ "$(free_kib)" -ge "$want" ] && return 0
  case "$dir" in
    "$(readlink -f "$S2S_CACHE")"/*)
      log "still short: removing the build directory $dir (everything is rebuilt)"
      rm -rf "$dir" && mkdir -p "$dir" ;;
  esac
  [ "$(free_kib)" -ge "$want" ] ||
    die "only $(( $(free_kib) / 1024 / 1024 )) GiB free for $dir; a build needs ${S2S_MIN_FREE_GIB:-15}: free space there (or set S2S_MIN_FREE_GIB)"
}

# Installs Debian packages (apt-get, through sudo unless root).
apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@"
}

# Debian packages the build needs: libclang for RocksDB's bindgen, OpenSSL headers for
# librdkafka's TLS and the HTTP client, a C/C++ toolchain and zlib for the bundled C
# libraries, python3 for picking free ports.
ensure_system_deps() {
  local missing=() pkg
  for pkg in libclang-dev libssl-dev pkg-config make gcc g++ zlib1g-dev python3; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  apt_install "${missing[@]}"
}

# promtool, for the checks of deploy/prometheus and of the services' /metrics pages: from
# Debian's prometheus package (which also brings a Prometheus server; it is not started).
ensure_promtool() {
  command -v promtool >/dev/null && return 0
  log "installing Debian package prometheus (for promtool)"
  apt_install prometheus
  command -v promtool >/dev/null || die "promtool is still missing after installing prometheus"
}

# Headless Chromium and its WebDriver, for the console's browser test: Debian's chromium
# and chromium-driver (the test drives /usr/bin/chromium through /usr/bin/chromedriver).
ensure_chromium() {
  [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && return 0
  log "installing Debian packages chromium and chromium-driver (for the console's browser test)"
  apt_install chromium chromium-driver
  [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] ||
    die "chromium or chromedriver is still missing after installing them"
}

ensure_rust_tools() {
  command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs)"
  if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    log "adding rustfmt and clippy"
    rustup component add rustfmt clippy
  fi
}

# cargo fuzz (libFuzzer driver), for scripts/fuzz and the test suite's bounded fuzz runs:
# built from crates.io into the cache, once. It passes rustc nightly-only flags
# (sanitizer coverage); RUSTC_BOOTSTRAP=1, set by scripts/fuzz, lets the one stable
# toolchain take them.
CARGO_FUZZ_VERSION=0.13.1
ensure_cargo_fuzz() {
  local root="$S2S_CACHE/cargo-fuzz-$CARGO_FUZZ_VERSION"
  if [ ! -x "$root/bin/cargo-fuzz" ]; then
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION into $root"
    CARGO_TARGET_DIR="$S2S_CACHE/cargo-fuzz-build" \
      cargo install --quiet --locked --root "$root" cargo-fuzz --version "$CARGO_FUZZ_VERSION"
  fi
  export PATH="$root/bin:$PATH"
}

# Python tools of the tests (scripts/requirements.txt) in a virtualenv in the cache, rebuilt
# when the list changes; its bin/ goes first on PATH.
ensure_python_tools() {
  local venv sum
  sum=$(sha256sum scripts/requirements.txt | cut -c1-12)
  venv="$S2S_CACHE/venv-$sum"
  # `.complete` is written only after every package installed: a broken install is redone.
  if [ ! -e "$venv/.complete" ]; then
    log "installing the tests' Python tools into $venv"
    rm -rf "$venv"
    if ! python3 -m venv "$venv" 2>/dev/null; then
      log "installing Debian package python3-venv"
      apt_install python3-venv
      rm -rf "$venv"
      python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements.txt
    touch "$venv/.complete"
  fi
  export PATH="$venv/bin:$PATH"
}

# kubectl, for `kubectl kustomize` (the tests build deploy/k8s as a cluster would): the
# `kubectl` package where the machine's apt sources have it (Google's, as here); Debian
# 12's own kubernetes-client (1.20) is too old for the kustomization.
ensure_kubectl() {
  if ! command -v kubectl >/dev/null; then
    log "installing kubectl (apt package kubectl)"
    apt_install kubectl ||
      die "no apt source here has kubectl: install kubectl 1.27 or newer (https://kubernetes.io/docs/tasks/tools/)"
  fi
  kubectl kustomize --help >/dev/null 2>&1 ||
    die "this kubectl has no kustomize: install kubectl 1.27 or newer (https://kubernetes.io/docs/tasks/tools/)"
}

# Tansu, a Kafka-API-compatible broker, built once into the cache (about 20 minutes on 2 cores).
ensure_tansu() {
  if [ -x "$TANSU_BIN" ] && "$TANSU_BIN" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    return 0
  fi
  log "building Tansu $TANSU_VERSION into $TANSU_ROOT (once; about 20 minutes on 2 cores)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql \
    --root "$TANSU_ROOT" --quiet
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Polls until something listens on 127.0.0.1:$1, for at most $2 seconds.
wait_for_port() {
  local port=$1 deadline=$((SECONDS + $2))
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.1 # poll
  done
}

# start_broker STORAGE_URL WORKDIR: starts Tansu on a free loopback port; sets
# BROKER_ADDR and BROKER_PID. WORKDIR holds its log (and sqlite file, if any).
start_broker() {
  local storage=$1 workdir=$2 port
  mkdir -p "$workdir"
  port=$(free_port)
  # The broker reads a .env file from its working directory: run it in WORKDIR, which
  # holds none.
  (cd "$workdir" && exec "$TANSU_BIN" broker \
      --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" \
      --storage-engine "$storage" >"$workdir/broker.log" 2>&1) &
  BROKER_PID=$!
  BROKER_ADDR="127.0.0.1:$port"
  if ! wait_for_port "$port" 30; then
    tail -20 "$workdir/broker.log" >&2 || true
    die "broker did not listen on $BROKER_ADDR within 30 s (log above)"
  fi
  log "broker (Tansu $TANSU_VERSION, $storage) on $BROKER_ADDR, pid $BROKER_PID"
}

stop_broker() {
  if [ -n "${BROKER_PID:-}" ] && kill -0 "$BROKER_PID" 2>/dev/null; then
    kill "$BROKER_PID" 2>/dev/null || true
    wait "$BROKER_PID" 2>/dev/null || true
  fi
  BROKER_PID=""
}
