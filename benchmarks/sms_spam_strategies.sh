#!/usr/bin/env bash
# The SMS spam strategy experiment: recipe=sms_spam_classify (all-MiniLM-L6-v2, max_length 64, one epoch,
# 70/10/20 split) once per classify.strategy, each with a learning rate suited to what it trains (features fits no
# learning rate: its logistic regression is fitted by scikit-learn), then the
# table (benchmarks/classify_table.py). Run from the repository root with the shared data beside it:
#   bash benchmarks/sms_spam_strategies.sh [OUT=outputs/sms_spam_strategies] [extra overrides...]
# STRATEGIES="lora full" runs only those (the table still lists every finished run under OUT).
set -euo pipefail
OUT=${1:-outputs/sms_spam_strategies}
shift || true
FTCTL=${FTCTL:-ftctl}
PY=${PY:-python}
declare -A LR=([features]=1e-4 [head]=2e-3 [last_block]=5e-4 [lora]=1e-3 [full]=1e-4)
for s in ${STRATEGIES:-features head last_block lora full}; do
  $FTCTL train recipe=sms_spam_classify classify.strategy=$s trainer.lr=${LR[$s]} output_dir=$OUT/$s overwrite=true "$@"
done
$PY benchmarks/classify_table.py "$OUT" --positive spam --csv "$OUT/table.csv" | tee "$OUT/table.md"
