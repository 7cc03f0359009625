#!/usr/bin/env bash
# The prepared device check (issue 20): one command, < 8 min on one H100, no network.
#
#   bash bench/gpu_check.sh [--cpu-smoke] [RESULTS.json]
#
# Steps, each timed and recorded (status ok / failed / skipped, seconds, output tail, its numbers):
#   1. cuda_tests   the tests that exercise CUDA code or skip without it (skipped in --cpu-smoke:
#                   CI runs the suite itself)
#   2. bench9       bench/bench_prefix_kernels.py: the prefix-cache kernels (fp32, SDPA, split) vs
#                   naive scoring, on a model of the embedded model's architecture (SmolLM2-135M)
#                   with random weights (its 94 MB GGUF cannot be carried; the tokenizer is)
#   3. pack_bench   bench/bench_pack.py --smoke --device cuda, if that file exists; then
#      select_pack_bench: bench/bench_select_pack.py --smoke --device cuda (a run's select: trials packed)
#   4. lora_1b      a ~1.1B Llama (TinyLlama-1.1B's config) built from a config with random
#                   weights in bf16, LoRA (peft) + gradient checkpointing, a few optimizer steps:
#                   step time, tokens/s, peak allocated and reserved memory
#   5. peak reserved memory over the whole check (torch.cuda.max_memory_reserved per step)
# Results: one JSON file: the argument, else $OUT/gpu_check.json when $OUT is set, else
# bench/gpu_check.json. Prepare the carried folders first with bench/gpu_prepare.sh.
# --cpu-smoke: the same steps on CPU at tiny sizes (tests/test_gpu_check.py runs it in CI).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
RESULT=""
for a in "$@"; do
  case "$a" in
    --cpu-smoke) SMOKE=1 ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $a (expected --cpu-smoke and/or a results path)" >&2; exit 2 ;;
    *) RESULT="$a" ;;
  esac
done
RESULT=${RESULT:-${OUT:+$OUT/gpu_check.json}}
RESULT=${RESULT:-bench/gpu_check.json}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
[ -d .gpu-data/data ] && export FEWTUNE_DATA_DIR=${FEWTUNE_DATA_DIR:-$PWD/.gpu-data/data}
if [ "$SMOKE" = 1 ]; then export CUDA_VISIBLE_DEVICES=""; fi

if [ -d .gpu-wheels ] && [ "$SMOKE" = 0 ]; then  # the GPU image lacks these (gpu_prepare.sh)
  # by name, so that what the image already has (typing-extensions, numpy, …) is kept
  "$PY" -m pip install --quiet --no-index --find-links .gpu-wheels pydantic pooch gguf > "$WORK/pip.log" 2>&1 \
    || { echo "pip install from .gpu-wheels failed:"; tail -5 "$WORK/pip.log"; }
fi

# step NAME TIMEOUT CMD...: run, keep the tail of its output and its status in $WORK/NAME.step.json
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  echo "== $name" >&2
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1; rc=$?
  tail -20 "$WORK/$name.log" >&2
  "$PY" - "$WORK" "$name" "$rc" "$((SECONDS - t0))" <<'PY'
import json, sys
from pathlib import Path
work, name, rc, secs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
status = "ok" if rc == 0 else ("timed out" if rc == 124 else f"failed (exit {rc})")
tail = (work / f"{name}.log").read_text(errors="replace")[-3000:]
(work / f"{name}.step.json").write_text(json.dumps({"status": status, "seconds": secs, "output_tail": tail}))
PY
}
skip() { printf '{"status": "skipped", "reason": "%s"}' "$2" > "$WORK/$1.step.json"; }

# A model directory of the embedded model's architecture with random weights (bench 9's model).
"$PY" - "$WORK/model" "$SMOKE" <<'PY' > "$WORK/model.log" 2>&1 || { echo "building the random model failed:"; cat "$WORK/model.log"; }
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
out, smoke = Path(sys.argv[1]), sys.argv[2] == "1"
src = Path(".gpu-data/smollm2")
if not src.is_dir():  # this machine: the converted embedded model (config + tokenizer only are used)
    from fewtune.models.loading import embedded_model_dir
    src = embedded_model_dir()
cfg = AutoConfig.from_pretrained(src)
if smoke:
    cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = 2, 64, 128
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 16
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
for f in src.iterdir():
    if f.suffix != ".safetensors" and f.name != "config.json":
        shutil.copy2(f, out / f.name)
PY

if [ "$SMOKE" = 1 ]; then
  skip cuda_tests "cpu smoke: CI runs the tests itself"
  step bench9 120 "$PY" bench/bench_prefix_kernels.py --shots 2 --queries 4 --repeats 1 --no-write --threads 1 \
    --model "$WORK/model" --json "$WORK/bench9.json"
else
  # the tests with CUDA branches that need no embedded model (its GGUF is not carried)
  step cuda_tests 90 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_precision.py \
    "tests/test_executors.py::test_memory_meter_cuda_peaks_are_per_run"
  step bench9 120 "$PY" bench/bench_prefix_kernels.py --no-write --queries 64 --repeats 3 --model "$WORK/model" --json "$WORK/bench9.json"
fi
if [ ! -f bench/bench_pack.py ]; then skip pack_bench "bench/bench_pack.py not present"
elif [ "$SMOKE" = 1 ]; then skip pack_bench "cpu smoke: the pack bench runs on the GPU only here"
else step pack_bench 150 "$PY" bench/bench_pack.py --smoke --device cuda
fi
if [ "$SMOKE" = 1 ]; then skip select_pack_bench "cpu smoke: the select-trials pack bench runs on the GPU only here"
else step select_pack_bench 120 "$PY" bench/bench_select_pack.py --smoke --device cuda
fi

step lora_1b 90 "$PY" - "$WORK/lora_1b.json" "$SMOKE" <<'PY'
"""bf16 weights + LoRA + gradient checkpointing on a 1B-class Llama with random weights."""
import json, sys, time
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig
out, smoke = sys.argv[1], sys.argv[2] == "1"
dev = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2) if smoke \
    else dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4)
cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, **size)  # TinyLlama-1.1B's shape
torch.manual_seed(0)
with torch.device(dev):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
params = sum(p.numel() for p in model.parameters())
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.enable_input_require_grads()
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
batch, seq, steps = (2, 32, 3) if smoke else (8, 512, 6)
ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=dev)
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
times, losses = [], []
for _ in range(steps):
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t); losses.append(float(loss))
assert all(map(lambda x: x == x and abs(x) < 1e4, losses)), losses
step_s = sorted(times[1:])[len(times[1:]) // 2]
res = {"device": str(dev), "parameters": params, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
       "batch": batch, "seq": seq, "steps": steps, "median_step_s": step_s, "tokens_per_s": batch * seq / step_s,
       "losses": losses, "gradient_checkpointing": bool(getattr(model.base_model.model, "is_gradient_checkpointing", True))}
if dev.type == "cuda":
    res["peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    res["peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
json.dump(res, open(out, "w"), indent=1)
print(json.dumps(res))
PY

mkdir -p "$(dirname "$RESULT")"
"$PY" - "$WORK" "$RESULT" "$SMOKE" <<'PY'
import json, os, platform, sys
from pathlib import Path
import torch
work, result, smoke = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
steps = {}
for name in ("cuda_tests", "bench9", "pack_bench", "lora_1b"):
    f = work / f"{name}.step.json"
    steps[name] = json.loads(f.read_text()) if f.exists() else {"status": "not run"}
    data = work / f"{name}.json"
    if data.exists():
        steps[name]["results"] = json.loads(data.read_text())
peaks = [s["results"].get("peak_reserved_mb") for s in steps.values() if isinstance(s.get("results"), dict)]
out = {"mode": "cpu-smoke" if smoke else "gpu", "python": platform.python_version(), "torch": torch.__version__,
       "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
       "load_average": os.getloadavg(), "peak_reserved_mb": max([p for p in peaks if p] or [None], key=lambda x: x or 0),
       "steps": steps, "ok": all(s["status"] in ("ok", "skipped") for s in steps.values())}
result.write_text(json.dumps(out, indent=1))
print(f"gpu_check: {'ok' if out['ok'] else 'FAILED'}; results in {result}")
sys.exit(0 if out["ok"] else 1)
PY
