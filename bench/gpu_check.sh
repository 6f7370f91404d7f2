#!/usr/bin/env bash
# One prepared check for a GPU machine (about 8 minutes on an H200), everything written to one folder:
#
#     bash bench/gpu_check.sh [OUT_DIR]               # OUT_DIR defaults to $OUT
#     bash bench/gpu_check.sh --device cpu [OUT_DIR]  # dry run on the CPU: same steps at toy sizes (tests run it)
#
# 1. search-step bench rows (plain, default, K=4, second order; --amp; --compile) with dispatched operators and
#    host syncs per step, CUDA syncs counted by torch.cuda.set_sync_debug_mode("warn")  -> search_step*.{txt,json}
# 2. a 1-epoch search on CIFAR-shaped random images and its projected 50-epoch CIFAR-10 time  -> search_epoch.txt
# 3. the train.py step bench (DARTS_V2, fp32 / channels_last / bf16)                           -> train_step.txt
# 4. a 1-GPU torchrun smoke run (NCCL on CUDA, gloo on the CPU), with an energy budget          -> torchrun.txt
# 5. a Zeus energy measurement of one network (latency x watts on the CPU)                      -> zeus.txt
# Each step's exit status goes to status.txt; a failing step does not stop the others.
set -u
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE="$2"; shift 2; fi
OUT_DIR="${1:-${OUT:-}}"
if [ -z "$OUT_DIR" ]; then echo "error: give the output folder as the argument or in \$OUT" >&2; exit 2; fi
case "$DEVICE" in cuda|cpu) ;; *) echo "error: --device must be cuda or cpu, not $DEVICE" >&2; exit 2;; esac
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.." || exit 2
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
if [ "$DEVICE" = cuda ]; then
    BENCH="--batch_size 64 --steps 10 --warmup 3"; TRAIN="--batch_size 96 --steps 10 --warmup 3"
    IMAGES=500; SEARCH="--batch_size 64"; NET="--init_channels 16 --layers 8"; NB_LAYERS=20; NB_CH=36
else  # dry run: toy sizes, every step still runs
    BENCH="--batch_size 2 --layers 3 --init_channels 4 --steps 1 --warmup 1 --no_memory"
    TRAIN="--batch_size 2 --layers 2 --init_channels 4 --steps 1 --warmup 1 --no_memory"
    IMAGES=4; SEARCH="--batch_size 8"; NET="--init_channels 4 --layers 3"; NB_LAYERS=2; NB_CH=4
fi
: > "$OUT_DIR/status.txt"
run() {  # run NAME CMD...: output to NAME.txt, exit status to status.txt
    local name="$1"; shift
    echo "== $name: $*" | tee -a "$OUT_DIR/status.txt"
    "$@" > "$OUT_DIR/$name.txt" 2>&1
    local rc=$?
    echo "$name rc=$rc" >> "$OUT_DIR/status.txt"
    tail -n 15 "$OUT_DIR/$name.txt"
}
nvidia-smi > "$OUT_DIR/nvidia_smi.txt" 2>&1 || true
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())" \
    > "$OUT_DIR/versions.txt" 2>&1

# 1. search-step rows
run search_step python bench/search_step.py --device "$DEVICE" $BENCH --sync_debug \
    --only "plain,default,K=4,second order" --json "$OUT_DIR/search_step.json"
run search_step_amp python bench/search_step.py --device "$DEVICE" $BENCH --sync_debug --amp \
    --only "plain,default" --json "$OUT_DIR/search_step_amp.json"
run search_step_compile python bench/search_step.py --device "$DEVICE" $BENCH --sync_debug --compile \
    --only "plain,default,compile" --json "$OUT_DIR/search_step_compile.json"

# 2. one search epoch on random CIFAR-shaped images (an image folder: 10 classes x IMAGES), projected to CIFAR-10
DATA="$OUT_DIR/random_cifar"
python - "$DATA" "$IMAGES" <<'EOF'
import os, sys
import numpy as np
from PIL import Image
root, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
for split, count in (("train", n), ("val", max(1, n // 10))):
    for c in range(10):
        os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                os.path.join(root, split, f"c{c}", f"{i}.png"))
EOF
run search_epoch python train_search.py --dataset imagefolder --data "$DATA" --device "$DEVICE" $SEARCH $NET \
    --epochs 1 --workers 4 --log_dir "$OUT_DIR/runs" --run_name search_epoch --wandb disabled
python - "$OUT_DIR" "$IMAGES" <<'EOF' >> "$OUT_DIR/search_epoch.txt" 2>&1
import json, os, sys
out, n = sys.argv[1], int(sys.argv[2])
rows = [json.loads(line) for line in open(os.path.join(out, "runs", "search_epoch", "metrics.jsonl"))]
epoch_s = rows[0]["epoch_s"]
scale = 25000 / (10 * n * 0.5)  # CIFAR-10's weight half (25,000 images) over this run's (train_portion 0.5)
print(f"1 epoch on {10 * n} images: {epoch_s:.1f} s (evaluation included); projected 50-epoch CIFAR-10 search: "
      f"{50 * epoch_s * scale / 60:.1f} min")
EOF
tail -n 1 "$OUT_DIR/search_epoch.txt"

# 3. train.py's step
run train_step python bench/train_step.py --device "$DEVICE" $TRAIN --json "$OUT_DIR/train_step.json"

# 4. torchrun on one process (NCCL on CUDA), with --energy_budget (its per-step read of the alphas: utils.HostCopy)
run torchrun python -m torch.distributed.run --standalone --nproc_per_node 1 train_search.py --dataset digits \
    --device "$DEVICE" --epochs 1 --init_channels 4 --layers 3 --log_dir "$OUT_DIR/runs" --run_name torchrun \
    --energy_budget 0.3 --wandb disabled

# 5. energy of one network, measured (Zeus on a GPU; latency x 15 W on the CPU dry run)
run zeus python - "$DEVICE" "$NB_CH" "$NB_LAYERS" <<'EOF'
import sys
import genotypes as G
from dl_energy_estimator import EnergyEstimator
from dl_energy_estimator.measure import measure
from model import build_network
device, channels, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
net = build_network(G.DARTS_V2, channels, 10, layers, False, 3, 32).eval()
net.drop_path_prob = 0.0
kw = {"source": "zeus"} if device == "cuda" else {"source": "latency_x_watts", "watts": 15.0, "window_s": 0.05}
m = measure([(net, (1, 3, 32, 32))], device=device, **kw)
estimate = EnergyEstimator.default().model_energy(net, (1, 3, 32, 32))
print(f"DARTS_V2 {channels} ch {layers} layers, batch 1: measured {1e3 * m[0]:.3f} mJ ({m.source}); "
      f"default estimator {1e3 * estimate:.3f} mJ")
EOF
echo "done: $OUT_DIR" | tee -a "$OUT_DIR/status.txt"
! grep -q "rc=[1-9]" "$OUT_DIR/status.txt"
