#!/usr/bin/env bash
# Pack the CIFAR-10 binary version into parts small enough to send to a remote GPU machine.
# One call's working tree holds 64 MiB, so the six .bin files go as an xz -9 tar split
# into parts under 60 MiB, in an ignored folder, each sent by its own call (carry).
#   bash CIFAR_10/gpu/prepare_transfer.sh ../shared/data/cifar-10-batches-bin
set -euo pipefail
src=${1:?usage: prepare_transfer.sh PATH/cifar-10-batches-bin}
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../runs/transfer"   # runs/ is git-ignored
mkdir -p "$out"
rm -f "$out"/cifar.tar.xz.part-*
tar -C "$(dirname "$src")" -cf - "$(basename "$src")" | xz -9 -T2 | split -b 58M -d - "$out/cifar.tar.xz.part-"
ls -l "$out"
