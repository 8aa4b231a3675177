#!/usr/bin/env bash
# Provide bitcoind and bitcoin-cli for the regtest tests and prints the directory that
# holds them on stdout (everything else goes to stderr).
#
# Order of preference:
#   1. $BITCOIND (path to bitcoind; bitcoin-cli is looked for beside it, or $BITCOIN_CLI);
#   2. a bitcoind on PATH;
#   3. binaries cached under ${REVAULT_CACHE:-~/.cache/revault}/bitcoin-31.99-zmq/bin;
#   4. a build from the Bitcoin Core tree inside the sdist of py-bitcoinkernel==0.1.0a5
#      (Bitcoin Core 31.99, with ZMQ notifications for the watchtower), cached as in 3
#      so later runs skip the ~9 minute build.
set -euo pipefail

log() { echo "get-bitcoind: $*" >&2; }
SDIST_SHA256=71b91eecac7a8b07248be04471c3bf98016b38bf823aefd28f7b31179940520d

if [ -n "${BITCOIND:-}" ]; then
    dir=$(cd "$(dirname "$BITCOIND")" && pwd)
    cli=${BITCOIN_CLI:-$dir/bitcoin-cli}
    [ -x "$BITCOIND" ] || { log "BITCOIND=$BITCOIND is not executable"; exit 1; }
    [ -x "$cli" ] || { log "no bitcoin-cli beside $BITCOIND (set BITCOIN_CLI)"; exit 1; }
    echo "$dir"; exit 0
fi
if command -v bitcoind >/dev/null 2>&1 && command -v bitcoin-cli >/dev/null 2>&1; then
    dirname "$(command -v bitcoind)"; exit 0
fi

cache=${REVAULT_CACHE:-$HOME/.cache/revault}
# The -zmq suffix replaces, once, the earlier cache built without ZMQ.
prefix=$cache/bitcoin-31.99-zmq
if [ -x "$prefix/bin/bitcoind" ] && [ -x "$prefix/bin/bitcoin-cli" ]; then
    echo "$prefix/bin"; exit 0
fi

log "no bitcoind found; building Bitcoin Core 31.99 into $prefix (about 9 minutes on 2 cores)"
need=()
for pkg in build-essential cmake pkg-config libboost-dev libevent-dev libsqlite3-dev libzmq3-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    log "installing Debian packages: ${need[*]}"
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >&2
fi

work=$cache/build
mkdir -p "$work"
lock=$cache/.build.lock
exec 9>"$lock"
flock 9  # two concurrent runs build once
if [ -x "$prefix/bin/bitcoind" ]; then echo "$prefix/bin"; exit 0; fi

if [ ! -d "$work/src/depend/bitcoin" ]; then
    rm -rf "$work/sdist" "$work/src"; mkdir -p "$work/sdist" "$work/src"
    # --no-binary for this package only: with :all: pip also builds the sdist's build
    # tools (scikit-build-core, hatchling) from source just to read its metadata, which
    # takes minutes. The archive is the same; its hash is checked below.
    python3 -m pip download --quiet --no-deps --no-binary py-bitcoinkernel \
        -d "$work/sdist" py-bitcoinkernel==0.1.0a5 >&2
    sdist=$work/sdist/py_bitcoinkernel-0.1.0a5.tar.gz
    echo "$SDIST_SHA256  $sdist" | sha256sum --check --quiet - >&2 \
        || { log "unexpected contents in $sdist"; rm -f "$sdist"; exit 1; }
    tar -xzf "$sdist" -C "$work/src" --strip-components=1 >&2
fi
cd "$work/src/depend/bitcoin"
cmake -B build -DBUILD_DAEMON=ON -DBUILD_CLI=ON -DENABLE_WALLET=ON -DBUILD_TESTS=OFF \
    -DBUILD_BENCH=OFF -DBUILD_FUZZ_BINARY=OFF -DBUILD_GUI=OFF -DWITH_ZMQ=ON \
    -DENABLE_IPC=OFF -DBUILD_KERNEL_LIB=OFF -DBUILD_TX=OFF -DBUILD_UTIL=OFF \
    -DBUILD_WALLET_TOOL=OFF -DCMAKE_BUILD_TYPE=Release >&2
cmake --build build -j"$(nproc)" --target bitcoind bitcoin-cli >&2
mkdir -p "$prefix/bin.tmp"
cp build/bin/bitcoind build/bin/bitcoin-cli "$prefix/bin.tmp/"
rm -rf "$prefix/bin"; mv "$prefix/bin.tmp" "$prefix/bin"   # appear whole or not at all
log "built $("$prefix/bin/bitcoind" -version | head -1)"
echo "$prefix/bin"
