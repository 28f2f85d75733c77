#!/usr/bin/env bash
# Issue 29 item 4, prepared for an accelerator: SmolLM2-135M on the offline local corpus
# (docs/real_text.md) with the paper's schedule -- 20 rounds x 10 expert steps of 64 x 128 windows,
# lr 2e-3 cosine to 2e-4, router 10 steps after every 30th expert step (router lr 2e-3), evaluation
# every 20 steps -- for seeds 0,1,2: local, fedavg, pfedmoe and comigs with the learned (GPT-2
# reference) router, then pfedmoe and comigs with the Llama reference's noisy top-k router
# (model.router_kind=noisy_topk; local and fedavg have no router, so one run serves both kinds).
#
#   bash experiments/router_comparison.sh OUT            # OUT/learned, OUT/noisy_topk: results.json, comparison tables
#
# Every size is an environment variable, so the same script checks itself on a CPU in minutes:
#   ROUNDS=1 STEPS=1 SEEDS=0 METHODS=comigs NOISY_METHODS=comigs BATCH=2 SEQ=32 EVAL_BATCH=4 \
#   TRAIN_TOKENS=4000 VALID_TOKENS=1000 TEST_TOKENS=512 bash experiments/router_comparison.sh /tmp/rc
set -euo pipefail
OUT=${1:?usage: bash experiments/router_comparison.sh OUT}
PY=${PYTHON:-python}
CORPUS=${CORPUS:-data/local_corpus}
USERS=${USERS:-de,fr,code,shakespeare}
ROUNDS=${ROUNDS:-20}; STEPS=${STEPS:-10}; SEEDS=${SEEDS:-0,1,2}
METHODS=${METHODS:-local,fedavg,pfedmoe,comigs}; NOISY_METHODS=${NOISY_METHODS:-pfedmoe,comigs}
BATCH=${BATCH:-64}; SEQ=${SEQ:-128}; EVAL_BATCH=${EVAL_BATCH:-64}
TRAIN_TOKENS=${TRAIN_TOKENS:-400000}; VALID_TOKENS=${VALID_TOKENS:-50000}; TEST_TOKENS=${TEST_TOKENS:-50000}
N_USERS=$(echo "$USERS" | tr ',' '\n' | wc -l)
EVAL_EVERY=$(( 20 / STEPS > 0 ? 20 / STEPS : 1 ))

[ -f "$CORPUS/manifest.json" ] || "$PY" -m experiments.prepare_local_corpus --out "$CORPUS"

run() {  # run KIND METHODS
  "$PY" -m experiments.run --config=configs/smollm2_local.py --workdir="$OUT/$1" \
    --config.methods="$2" --config.seeds="$SEEDS" --config.model.router_kind="$1" \
    --config.train.rounds="$ROUNDS" --config.train.local_steps="$STEPS" \
    --config.train.batch_size="$BATCH" --config.train.seq_len="$SEQ" \
    --config.train.router_every=30 --config.train.router_steps=10 \
    --config.train.lr=2e-3 --config.train.router_lr=2e-3 \
    --config.data.text_files.root="$CORPUS" --config.data.n_users="$N_USERS" --config.data.categories="$USERS" \
    --config.data.train_tokens="$TRAIN_TOKENS" --config.data.valid_tokens="$VALID_TOKENS" \
    --config.data.test_tokens="$TEST_TOKENS" --config.eval.batch_size="$EVAL_BATCH" \
    --config.eval.every_rounds="$EVAL_EVERY" --config.checkpoint.every_rounds=5 \
    --config.output.progress=False
}

run learned "$METHODS"
run noisy_topk "$NOISY_METHODS"
echo "done: $OUT/learned and $OUT/noisy_topk"
