#!/usr/bin/env bash
# The GPU measurements of the speed-and-memory issue, in one script (some steps, or all):
#
#   benchmarks/gpu.sh PEER_SCRIPT OUT_DIR ['speed speed-cl compiled memory xl-speed xl-memory sd35-speed' | all]
#
# speed:    SD 1.5 at 512 px, batch $BATCH (default 16), bf16: sdtune with cached latents and
#           text states, side by side with diffusers' train_text_to_image.py (PEER_SCRIPT),
#           then one profiled run of each (where a step's time goes)
# speed-cl: the same with channels-last activations
# compiled: the same with channels-last and torch.compile of the UNet (the first compilation
#           takes about 2 minutes; inductor's on-disk cache makes later runs start sooner)
# memory:   the two memory recipes at batch 1, peak CUDA memory allocated: full fine-tune
#           (target <= 16 GB) and LoRA (target <= 6 GB)
# xl-speed: SDXL (the published 2.57B UNet, random weights) at 1024 px, batch $XL_BATCH (default
#           4), bf16, side by side with diffusers' train_text_to_image_sdxl.py ($PEER_SDXL; both
#           encode images and captions once before training)
# xl-memory: SDXL at 1024 px, batch 1: LoRA (target <= 12 GiB) and full fine-tune (target <=
#           24 GiB), peak CUDA memory allocated
# sd35-speed: SD 3.5 Medium (the published 2.24B MMDiT, CLIP-L/G, T5-XXL, random weights) LoRA at
#           1024 px, batch $SD35_BATCH (default 1), bf16, side by side with diffusers'
#           train_dreambooth_lora_sd3.py ($PEER_SD3; rank 4 on its attention projections for
#           both; each image's caption encoded by all three encoders at every step, in both)
#
# Every step has its own time limit (STEP_LIMIT seconds, default 500; DEADLINE seconds from the
# start, when set, ends the last one sooner) and a failing step does not stop the others; a
# step stopped short keeps its finished runs' results in OUT_DIR/STEP.partial, and the exit
# status is 1 when a step failed or was skipped. Results, logs and profiles go to OUT_DIR; data,
# model and cache folders stay in $WORK (default /tmp/sdtune-gpu-bench) for the next steps.
# Each step takes 1.5 to 4.5 minutes on one H100.
set -u
usage="usage: benchmarks/gpu.sh PEER_SCRIPT OUT_DIR ['speed speed-cl compiled memory xl-speed xl-memory sd35-speed' | all]"
peer=${1:?$usage}
out=${2:?$usage}
what=${3:-all}
batch=${BATCH:-16}
images=${IMAGES:-256}
workers=${WORKERS:-4}
work=${WORK:-/tmp/sdtune-gpu-bench}
limit=${STEP_LIMIT:-500}
deadline=${DEADLINE:-0}  # seconds from the start after which no step runs on (0: none)
for word in $what; do
    case $word in speed | speed-cl | compiled | memory | xl-speed | xl-memory | sd35-speed | all) ;;
    *) echo "benchmarks/gpu.sh: unknown step '$word' (speed, speed-cl, compiled, memory, xl-speed, xl-memory, sd35-speed, all)" >&2
       exit 2 ;;
    esac
done
case " $what " in *" xl-speed "*)
    if [ -z "${PEER_SDXL:-}" ] || [ ! -f "$PEER_SDXL" ]; then
        echo "benchmarks/gpu.sh: xl-speed needs PEER_SDXL=PATH of diffusers' train_text_to_image_sdxl.py" >&2
        exit 2
    fi
esac
case " $what " in *" sd35-speed "*)
    if [ -z "${PEER_SD3:-}" ] || [ ! -f "$PEER_SD3" ]; then
        echo "benchmarks/gpu.sh: sd35-speed needs PEER_SD3=PATH of diffusers' train_dreambooth_lora_sd3.py" >&2
        exit 2
    fi
esac
failed=0
mkdir -p "$out" "$work"
common=(--model sd15 --resolution 512 --peak-tflops 790 --images "$images" --workers "$workers" --work "$work"
        --out "$out" --no-readme)
xl_common=(--model sdxl --resolution 1024 --peak-tflops 790 --images "$images" --workers "$workers"
           --work "$work" --out "$out" --no-readme)

step() {  # step NAME ARGS...: one harness invocation, limited, logged
    local name=$1
    shift
    echo "== $name: python -m benchmarks.throughput $*" >&2
    local started=$SECONDS step_limit=$limit
    if [ "$deadline" -gt 0 ] && [ $((deadline - SECONDS)) -lt "$step_limit" ]; then
        step_limit=$((deadline - SECONDS))
    fi
    if [ "$step_limit" -lt 30 ]; then
        echo "== $name: skipped, too little time left" >&2
        failed=1
        return
    fi
    rm -f "$work"/result-*.json "$work"/profile-*.txt "$work"/log-*.txt "$work"/spec-*.json
    timeout "$step_limit" python -m benchmarks.throughput "$@" >"$out/$name.log" 2>&1
    local code=$?
    echo "== $name: exit $code after $((SECONDS - started)) s" >&2
    tail -n 25 "$out/$name.log" >&2
    # a step stopped short keeps what its finished runs measured, and the worker logs
    if [ "$code" -ne 0 ]; then
        failed=1
        mkdir -p "$out/$name.partial"
        cp "$work"/result-*.json "$work"/profile-*.txt "$out/$name.partial/" 2>/dev/null
        tail -n 40 "$work"/log-*.txt >"$out/$name.partial/worker-logs.txt" 2>&1
    fi
}

case " $what " in *" speed "* | *" all "*)
    step speed "${common[@]}" --batch-size "$batch" --repeats "${REPEATS:-1}" --profile \
        --peer "$peer" --set data.cache_latents=true --set data.cache_text=true
esac
case " $what " in *" speed-cl "* | *" all "*)
    step speed-cl "${common[@]}" --batch-size "$batch" --repeats "${REPEATS:-1}" \
        --peer "$peer" --set data.cache_latents=true --set data.cache_text=true \
        --set train.channels_last=true
esac
case " $what " in *" compiled "* | *" all "*)
    step compiled "${common[@]}" --batch-size "$batch" --repeats "${REPEATS:-1}" --warmup 4 \
        --peer "$peer" --set data.cache_latents=true --set data.cache_text=true \
        --set train.channels_last=true --set train.compile=true
esac
case " $what " in *" memory "* | *" all "*)
    step memory-full "${common[@]}" --batch-size 1 --repeats 1 --warmup 2 --steps 4 --ema \
        --set model.gradient_checkpointing=true --set train.optimizer=adamw8bit \
        --set train.log_update_ratio=false --set data.cache_latents=true \
        --set data.cache_text=true
    step memory-lora "${common[@]}" --batch-size 1 --repeats 1 --warmup 2 --steps 4 \
        --set lora.enabled=true --set model.gradient_checkpointing=true \
        --set data.cache_latents=true --set data.cache_text=true
esac
case " $what " in *" xl-speed "* | *" all "*)
    if [ -z "${PEER_SDXL:-}" ] || [ ! -f "$PEER_SDXL" ]; then
        echo "== xl-speed: skipped, PEER_SDXL names no train_text_to_image_sdxl.py" >&2
        failed=1
    else
    step xl-speed "${xl_common[@]}" --batch-size "${XL_BATCH:-4}" --repeats "${REPEATS:-1}" \
        --peer "$PEER_SDXL"
    fi
esac
case " $what " in *" xl-memory "* | *" all "*)
    step xl-memory-lora "${xl_common[@]}" --batch-size 1 --repeats 1 --warmup 2 --steps 4 \
        --set lora.enabled=true --set model.gradient_checkpointing=true \
        --set data.cache_latents=true --set data.cache_text=true
    step xl-memory-full "${xl_common[@]}" --batch-size 1 --repeats 1 --warmup 2 --steps 4 \
        --set model.gradient_checkpointing=true --set train.optimizer=adamw8bit \
        --set train.log_update_ratio=false --set data.cache_latents=true \
        --set data.cache_text=true
esac
case " $what " in *" sd35-speed "* | *" all "*)
    if [ -z "${PEER_SD3:-}" ] || [ ! -f "$PEER_SD3" ]; then
        echo "== sd35-speed: skipped, PEER_SD3 names no train_dreambooth_lora_sd3.py" >&2
        failed=1
    else
    step sd35-speed --model sd35 --resolution 1024 --peak-tflops 790 --images "$images" \
        --workers "$workers" --work "$work" --out "$out" --no-readme \
        --batch-size "${SD35_BATCH:-1}" --repeats "${REPEATS:-1}" --peer "$PEER_SD3"
    fi
esac
exit $failed
