#!/bin/sh
# Build Toxiproxy's server from its public source, offline, with Debian's Go and library
# packages, for the benchmark's toxiproxy targets (tests/benchmarks/run.py --toxiproxy PATH).
#
#   scripts/build-toxiproxy.sh SOURCE_DIR OUTPUT_BINARY
#
# SOURCE_DIR is a Toxiproxy source tree, e.g. a release tag exported from its repository:
#   git --git-dir=toxiproxy.git archive v2.12.0 | tar -x -C /tmp/toxiproxy-src
# Go 1.19 (Debian 12) cannot build the go.mod's go 1.23 module, so the tree is built in
# GOPATH mode against /usr/share/gocode/src (the golang-*-dev packages), with one line of
# cmd/server/server.go patched for Debian's older zerolog (CallerMarshalFunc without the pc
# argument). When run as root, missing packages are installed with apt-get. The source tree
# is not modified: it is copied into a temporary GOPATH. Says what it did on stdout; the
# last line is the build's description, also written to OUTPUT_BINARY.build.txt, which the
# benchmark records in its results header.
set -eu

if [ $# -ne 2 ]; then
    echo "usage: $0 SOURCE_DIR OUTPUT_BINARY" >&2
    exit 2
fi
SOURCE_DIR=$1
OUTPUT=$2
if [ ! -f "$SOURCE_DIR/cmd/server/server.go" ]; then
    echo "$0: $SOURCE_DIR is not a Toxiproxy source tree (no cmd/server/server.go)" >&2
    exit 2
fi

# The server's imports outside the standard library and the tree itself, by Debian package:
# github.com/gorilla/mux, github.com/prometheus/client_golang/..., github.com/rs/zerolog/...,
# gopkg.in/tomb.v1 (the Go compiler: golang-go).
PACKAGES="golang-go golang-github-gorilla-mux-dev golang-github-prometheus-client-golang-dev
golang-github-rs-zerolog-dev golang-gopkg-tomb.v1-dev"

missing=""
for package in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $package"
    fi
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "$0: missing Debian packages:$missing (run as root to install them)" >&2
        exit 1
    fi
    echo "installing:$missing"
    # shellcheck disable=SC2086
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null; then
        echo "apt-get install failed; updating the package lists and trying again"
        apt-get update -q >/dev/null
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null
    fi
else
    echo "Debian packages present: $(echo $PACKAGES)"
fi

VERSION=${TOXIPROXY_VERSION:-$(sed -n 's/^# \[\([0-9][0-9.]*\)\].*/\1/p' \
    "$SOURCE_DIR/CHANGELOG.md" 2>/dev/null | head -n 1)}
VERSION=${VERSION:-unknown}

WORK=$(mktemp -d /tmp/toxiproxy-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
TREE=$WORK/gopath/src/github.com/Shopify/toxiproxy
mkdir -p "$(dirname "$TREE")"
cp -R "$SOURCE_DIR" "$TREE"

PATCH="none"
OLD='zerolog.CallerMarshalFunc = func(pc uintptr, file string, line int) string {'
NEW='zerolog.CallerMarshalFunc = func(file string, line int) string {'
ZEROLOG=/usr/share/gocode/src/github.com/rs/zerolog/globals.go
if grep -qF "$OLD" "$TREE/cmd/server/server.go" && [ -f "$ZEROLOG" ] \
        && ! grep -q 'CallerMarshalFunc = func(pc uintptr' "$ZEROLOG"; then
    sed -i "s/$(printf '%s' "$OLD" | sed 's/[][\.*^$/]/\\&/g')/$NEW/" "$TREE/cmd/server/server.go"
    grep -qF "$NEW" "$TREE/cmd/server/server.go"
    PATCH="cmd/server/server.go: CallerMarshalFunc(pc, file, line) -> (file, line) for Debian's zerolog"
    echo "patched $PATCH"
fi

GO_VERSION=$(go version | awk '{print $3}')
echo "building Toxiproxy $VERSION server with $GO_VERSION in GOPATH mode"
(
    cd "$TREE"
    GO111MODULE=off GOPATH="$WORK/gopath:/usr/share/gocode" GOCACHE="$WORK/cache" \
        GOFLAGS= CGO_ENABLED=0 \
        go build -ldflags "-X github.com/Shopify/toxiproxy.Version=$VERSION" \
        -o "$WORK/toxiproxy-server" ./cmd/server
)
mkdir -p "$(dirname "$OUTPUT")"
mv "$WORK/toxiproxy-server" "$OUTPUT"
LIBS=$(dpkg-query -W -f='${Package} ${Version}, ' golang-github-gorilla-mux-dev \
    golang-github-prometheus-client-golang-dev golang-github-rs-zerolog-dev \
    golang-gopkg-tomb.v1-dev | sed 's/, $//')
echo "built $OUTPUT ($("$OUTPUT" -version 2>&1 | head -n 1))"
DESCRIPTION="Toxiproxy $VERSION built from source with $GO_VERSION (Debian golang-go), GOPATH mode (GO111MODULE=off) against $LIBS; patch: $PATCH"
# The benchmark reads this beside the binary and records it in its results header.
printf '%s\n' "$DESCRIPTION" > "$OUTPUT.build.txt"
echo "wrote $OUTPUT.build.txt"
echo "$DESCRIPTION"
