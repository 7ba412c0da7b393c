#!/usr/bin/env bash
# Run on the device machine after the parts arrived (see prepare_transfer.sh):
#   bash CIFAR_10/gpu/device_train.sh ARCH EPOCHS [extra main.py flags...]
# Reassembles the data, checks the MD5s of the data README, trains, and writes the run
# (last.pth, best.pth, log.jsonl) under $OUT/ARCH, so it comes back with the reply.
set -euo pipefail
arch=${1:?arch}; epochs=${2:?epochs}; shift 2
here=$(cd "$(dirname "$0")" && pwd)
parts="$here/../runs/transfer"
data=/tmp/cifar-data
if [ ! -d "$data/cifar-10-batches-bin" ]; then
  mkdir -p "$data"
  cat "$parts"/cifar.tar.xz.part-* | xz -d | tar -C "$data" -xf -
fi
(cd "$data/cifar-10-batches-bin" && md5sum -c - <<'SUMS'
5dd7e06a14cb22eb9f671a540d1b7c25  data_batch_1.bin
5ea93a67294ea407fff1d09f752e9692  data_batch_2.bin
942cd6a4bcdd0dd3c604fbe906cb4421  data_batch_3.bin
ae636b3ba5c66a11e91e8cb52e771fcb  data_batch_4.bin
53f37980c15c3d472c316c40844f3f0d  data_batch_5.bin
803d5f7f4d78ea53de84dbe85f74fb6d  test_batch.bin
SUMS
)
python "$here/../main.py" --arch "$arch" --data "$data" --epochs "$epochs" --amp \
  --cache-dir /tmp/xnornet-cache --output-dir "${OUT:?}/$arch" "$@"
python -m xnornet.summarize "$OUT/$arch/log.jsonl"
