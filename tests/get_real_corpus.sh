#!/usr/bin/env bash
# A real corpus of odd images that nobody in this project made, for tests/test_odd_images.py
# (the test skips, saying so, until this has run). Two Debian packages that ship the test data
# of Go image libraries, BSD-licensed (see their copyright files):
#   golang-github-rwcarlsen-goexif-dev  55 camera JPEGs cut after their EXIF header (truncated
#                                       files from real cameras), f1..f8-exif.jpg (one "F" in each
#                                       EXIF orientation), JPEGs with corrupt EXIF
#   golang-golang-x-image-dev           WebP (lossy, lossless, alpha), TIFF (16-bit, gray,
#                                       paletted, tiled, LZW, CCITT), BMP (v5, colormap), PNG
# They are downloaded and unpacked (dpkg -x: nothing installed, no root needed beyond apt's
# download) into .cache/real_corpus (git-ignored): 4 MB to download, 18 MB unpacked. The tests never touch the network.
set -euo pipefail
dest="$(cd "$(dirname "$0")/.." && pwd)/.cache/real_corpus"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
apt-get download golang-github-rwcarlsen-goexif-dev golang-golang-x-image-dev
for deb in *.deb; do dpkg -x "$deb" "$tmp/x"; done
mkdir -p "$dest"
cp -r "$tmp/x/usr/share/gocode/src/." "$dest/"
find "$tmp/x/usr/share/doc" -name copyright -exec sh -c 'cp "$1" "$2/$(basename "$(dirname "$1")").copyright"' _ {} "$dest" \;
echo "real corpus in $dest"
