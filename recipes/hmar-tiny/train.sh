#!/usr/bin/env bash
# Reproduces the bundled hmar-tiny model from nothing but this repository: the procedural 10-class
# data set at 128 px, the tokenizer, its decoder retrained with 8 GroupNorm groups, stage 1 and
# stage 2 (float16 weight files, 28.5 MB in all).
#
#   bash recipes/hmar-tiny/train.sh [RUN_FOLDER]        # default runs/hmar-tiny
#
# STAGES picks what to run (default all five, in order), so the work can be split over several
# sessions or machines; each stage reads the previous one's output from RUN_FOLDER. The bundled
# model is RUN_FOLDER/stage2/model. The numbers below are the ones of the shipped weights; how that
# run went (interruptions, resumes, times) is in hmar/bundled/hmar-tiny/README.md. The shipped
# transformer was trained as
#   STAGES=data bash recipes/hmar-tiny/train.sh out/tiny
#   TOKENIZER=hmar/bundled/hmar-tiny STAGES="stage1 stage2" bash recipes/hmar-tiny/train.sh out/tiny
# with the tokenizer before its decoder was retrained (the decoder stage keeps every image's codes,
# so the transformer did not change); the shipped tokenizer's decoder was trained from that one as
#   IMAGES_PER_CLASS=1000 WORKERS=12 INIT_TOKENIZER=<the earlier bundled folder> STAGES="data decoder" bash recipes/hmar-tiny/train.sh out/tiny
# (stage 1 stopped by SIGTERM once and continued with RESUME=1), and measured with
#   python recipes/hmar-tiny/evaluate.py --model out/tiny/stage2/model
set -euo pipefail
RUN=${1:-runs/hmar-tiny}
RECIPE=$(cd "$(dirname "$0")" && pwd)
STAGES=${STAGES:-"data tokenizer decoder stage1 stage2"}
WORKERS=${WORKERS:-8}
# The decoder stage starts from the tokenizer stage's output, or (INIT_TOKENIZER=folder) from an existing one.
# It keeps only that tokenizer's encoder and code book and trains the decoder from a new initialisation
# (FRESH_DECODER=0 fine-tunes the existing decoder instead: that does not unlearn the corner spike).
INIT_TOKENIZER=${INIT_TOKENIZER:-$RUN/tokenizer/tokenizer}
FRESH_FLAG=$([ "${FRESH_DECODER:-1}" = 1 ] && echo --fresh-decoder || true)
# The frozen tokenizer of stages 1 and 2, exported with their model: the one the decoder stage wrote,
# or (TOKENIZER=folder) an existing one such as the bundled model's, to retrain only the transformer.
TOKENIZER=${TOKENIZER:-$RUN/decoder/tokenizer}
# RESUME=1 continues each stage's run in RUN_FOLDER (after a stop by SIGTERM/SIGINT, which checkpoints).
RESUME_FLAG=$([ "${RESUME:-0}" = 1 ] && echo --resume || true)

for stage in $STAGES; do
  case $stage in
    data)
      hmar train data --out "$RUN/data" --images-per-class "${IMAGES_PER_CLASS:-2000}" --size 128 --seed 0 --workers "$WORKERS" ;;
    tokenizer)
      hmar train tokenizer --data "$RUN/data" --out "$RUN/tokenizer" --config "$RECIPE/tokenizer.json" \
        --steps "${TOKENIZER_STEPS:-4000}" --batch-size "${TOKENIZER_BATCH:-64}" --lr 3e-4 --warmup-steps 200 \
        --export-dtype float16 --workers "$WORKERS" --checkpoint-every 1000 --seed 0 $RESUME_FLAG ;;
    decoder)
      # tokenizer.json's decoder has one channel per GroupNorm group at 128 px, which makes it draw a
      # spike at a fixed position into every image; 8 groups need no spike. Only the decoder learns,
      # so every image keeps its token codes.
      hmar train tokenizer --data "$RUN/data" --out "$RUN/decoder" --init "$INIT_TOKENIZER" --train decoder $FRESH_FLAG \
        --config "$RECIPE/tokenizer-decoder.json" --steps "${DECODER_STEPS:-4500}" --batch-size "${TOKENIZER_BATCH:-64}" --lr 3e-4 \
        --warmup-steps 100 --export-dtype float16 --workers "$WORKERS" --checkpoint-every 500 --seed 0 $RESUME_FLAG ;;
    stage1)
      hmar train stage1 --data "$RUN/data" --out "$RUN/stage1" --tokenizer "$TOKENIZER" \
        --model "$RECIPE/hmar.json" --token-cache "$RUN/tokens.pt" --loss-weighting "${LOSS_WEIGHTING:-equal}" \
        --steps "${STAGE1_STEPS:-12000}" --batch-size "${TRANSFORMER_BATCH:-256}" --lr 4e-4 --warmup-steps 300 --ema 0.999 \
        --workers "$WORKERS" --checkpoint-every 1000 --sample-every 4000 --seed 0 $RESUME_FLAG ;;
    stage2)
      hmar train stage2 --data "$RUN/data" --out "$RUN/stage2" --init "$RUN/stage1/model" --token-cache "$RUN/tokens.pt" \
        --steps "${STAGE2_STEPS:-600}" --batch-size "${TRANSFORMER_BATCH:-256}" --lr 2e-4 --warmup-steps 100 \
        --export-dtype float16 --workers "$WORKERS" --checkpoint-every 2000 --seed 0 $RESUME_FLAG ;;
    *) echo "unknown stage $stage (expected data, tokenizer, decoder, stage1, stage2)" >&2; exit 2 ;;
  esac
done
