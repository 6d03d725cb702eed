#!/usr/bin/env bash
# Benchmark 2 (and 3) on a machine with one CUDA GPU, as recorded in docs/benchmarks.md ("GPU").
#
#   bash bench/gpu.sh [OUTPUT_FOLDER]
#
# Runs these steps (GPU_STEPS, default "quick clip big": their limits add up to 540 s, within
# one 10-minute device call), each under its own time limit so that one failure still leaves
# the others' output:
#   quick     the plumbing check of benchmark 2 with tiny models on the GPU (seconds);
#   clip      benchmarks 2 and 3 with the default CLIP ViT-B/32 (full size, random weights; objects
#             and scenes) on 300 clips at 640x360, 8 frames a video, local executor, bf16, 32
#             videos a batch and 256 frames a forward pass;
#   captions  benchmark 2 with GIT-base captions too (the default stages but shots and OCR; no
#             naive loop, one ceiling pass: its sequential captions would take minutes);
#   big       benchmark 2 with CLIP on 2,400 clips (copies of 20), no naive loop, one ceiling
#             pass: long enough for start-up (12-14 s) to matter less and a steady rate to show;
#   real      benchmark 2 with CLIP on 600 copies of the real H.264 clips (B-frames), read with
#             decord and then with PyAV (`resources.decoder`), no naive loop, one ceiling pass
#             each: which decoder raises the decode ceiling on real footage. The clips are read
#             from $VIDLENS_SHARED_VIDEOS (default ../shared/videos). For the device tool, copy
#             them into the ignored cache first (cp -r ../shared/videos bench/.cache/real-clips),
#             carry bench/.cache/real-clips and set VIDLENS_SHARED_VIDEOS=bench/.cache/real-clips;
#   nvdec     `bench.nvdec`: FFmpeg's CUDA decoding (NVDEC, in PyAV's wheels) against its software
#             decoder on 1080p H.264 clips: opening a video, one stream, and one process per core
#             at once: whether decode workers should use it (generating its 10 s and 60 s clips
#             took 24 s on 2 cores);
#   tests     the model tests (embedding, captions, fast path), on the GPU when one is visible.
# Wheels found in .whl/ are installed to /tmp/site first (once a machine): a GPU machine without a
# package index can be given decord and av that way, and transformers where its own is older
# than 5.24 (5.24.0 suits the H200 image's huggingface-hub 1.33; 5.25 needs hub 2.4). When the
# quick step runs and fails, nothing else runs: the device time is kept for a second try.
# CLIP's own tokenizer (`bench.models.clip_tokenizer`) is built from bench/.cache/clip-bpe, which
# a machine without a package index cannot fetch: carry it (any benchmark run here makes it),
# or CLIP is built with the tiny test tokenizer, its prompts 2.5x as long.
set -uo pipefail
out=${1:-${OUT:-/tmp/vidlens-gpu}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    wheels=$(cd .whl && ls *.whl | sort | tr '\n' ' ')
    if [[ $(cat /tmp/site/.vidlens-wheels 2>/dev/null) != "$wheels" ]]; then
        rm -rf /tmp/site  # (pip --target --upgrade leaves the replaced version's metadata behind)
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
            || exit 1
        echo "$wheels" >/tmp/site/.vidlens-wheels
    fi
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log, report its end
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout -k 15 "$limit" "$@" >"$out/$name.log" 2>&1
    echo "[gpu.sh] $name: exit $? after $((SECONDS - start)) s" | tee -a "$out/steps.txt"
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,utilization.gpu --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, decord, av; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'decord', decord.__version__, 'av', av.__version__, 'cuda', torch.cuda.is_available())" \
    | tee -a "$out/gpu.txt"
steps=" ${GPU_STEPS:-quick clip big} "
bench=(python3 -m bench.pipeline --executors local --device cuda --size 640x360 --frames 8
       --videos-per-batch 32 --frames-per-batch 256)
[[ $steps == *" quick "* ]] && step quick 90 python3 -m bench.pipeline --quick --executors local --device cuda \
    --doc "$out/quick.md"
[[ $steps == *" quick "* ]] && [[ $(grep "quick:" "$out/steps.txt" | tail -n 1) != *"quick: exit 0 "* ]] \
    && { tail -n 30 "$out/quick.log"; exit 1; }
# each benchmark prints every thread's stack 20 s before its limit: a hang can then be read in its log
[[ $steps == *" clip "* ]] && step clip 250 "${bench[@]}" --clips 300 --stages embed,objects,scenes --dump-after 230 \
    --doc "$out/benchmarks.md"
[[ $steps == *" captions "* ]] && step captions 220 "${bench[@]}" --clips 300 --stages embed,objects,scenes,captions \
    --no-naive --ceiling-passes 1 --dump-after 200 --doc "$out/benchmarks.md"
[[ $steps == *" big "* ]] && step big 200 "${bench[@]}" --clips 2400 --stages embed,objects,scenes \
    --no-naive --ceiling-passes 1 --dump-after 180 --doc "$out/benchmarks.md"
[[ $steps == *" nvdec "* ]] && step nvdec 150 python3 -m bench.nvdec --doc "$out/benchmarks.md"
for decoder in decord pyav; do
    [[ $steps == *" real "* ]] && step "real-$decoder" 150 "${bench[@]}" --real --clips 600 --decoder "$decoder" \
        --stages embed,objects,scenes --no-naive --ceiling-passes 1 --dump-after 130 --doc "$out/benchmarks.md"
done
[[ $steps == *" tests "* ]] && step tests 80 python3 -m pytest -q -p no:cacheprovider -x tests/test_fast_path.py \
    tests/test_embed.py tests/test_captions.py
tail -n 3 "$out"/*.log
cat "$out/steps.txt"
