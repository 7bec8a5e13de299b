#!/bin/bash
# Plain DPO beside the demo's mDPO over three seeds, on a larger held-out set: a new world with the
# demo world's settings (another seed, 3,000 test scenes: 11,748 POPE questions per mode, 3,000
# descriptions, 3,000 questions per task), every model's answers, and the paired-bootstrap
# intervals of the differences (vlalign compare: whole scenes drawn; pooled over the seeds).
#   make demo && bash benchmarks/alignment_runs.sh runs/demo && bash benchmarks/dpo_larger_test.sh runs/demo runs/final
# Uses runs/demo/sft/model (base), runs/demo/dpo/model (mDPO, seed 0), runs/final/dpo-seed{1,2} (mDPO)
# and runs/final/dpo-plain (plain DPO, seed 0) from alignment_runs.sh; trains plain DPO with seeds 1
# and 2 when runs/final/dpo-plain-seed{1,2} are missing, and the demo's mDPO with another scene's
# image as the "corrupted" one (benchmarks/other_image_pairs.py) with seeds 0-2 when
# runs/final/dpo-other-image-seed{0,1,2} are missing. An evaluation already written is kept.
# Prints, per seed and pooled, mDPO - plain and each DPO model - base; pooled, other image - plain.
set -eu
D=${1:-runs/demo}; O=${2:-runs/final}; W=$O/larger-test
export HF_HUB_OFFLINE=1
V=${VLALIGN:-.venv/bin/vlalign}; PY=${PYTHON:-.venv/bin/python}
for seed in 1 2; do
  [ -f $O/dpo-plain-seed$seed/model/config.json ] || $V dpo --model.name_or_path=$D/sft/model --data.train=$D/pairs/train.jsonl --data.eval= --loss.weights='{sigmoid: 1.0, nll: 1.0}' --loss.beta=0.1 --train.max_steps=250 --train.batch_size=16 --train.lr=5e-5 --train.seed=$seed --train.save_every=0 --train.log_every=10 --train.output_dir=$O/dpo-plain-seed$seed --train.overwrite=true --train.progress=false
done
[ -f $O/pairs/train_other_image.jsonl ] || $PY benchmarks/other_image_pairs.py $D/pairs/train.jsonl $O/pairs/train_other_image.jsonl
for seed in 0 1 2; do
  [ -f $O/dpo-other-image-seed$seed/model/config.json ] || $V dpo --model.name_or_path=$D/sft/model --data.train=$O/pairs/train_other_image.jsonl --data.eval= --loss.weights='{mdpo: 1.0, nll: 1.0}' --loss.options='{mdpo: {conditional_weight: 0.5}}' --loss.beta=0.1 --train.max_steps=250 --train.batch_size=16 --train.lr=5e-5 --train.seed=$seed --train.save_every=0 --train.log_every=10 --train.output_dir=$O/dpo-other-image-seed$seed --train.overwrite=true --train.progress=false
done
if [ ! -f $W/manifest.json ]; then  # the demo world's settings, another seed, a larger test split only
  $PY -c "import json, sys, yaml; c = json.load(open(sys.argv[1]))['config']; c.update(seed=11, n_train=20, n_validation=20, n_test=3000, n_compositional=0); yaml.safe_dump({'world': c}, open(sys.argv[2], 'w'))" $D/world/manifest.json $O/larger-world.yaml
  $V world --config $O/larger-world.yaml --out $W --overwrite=true
fi
declare -A MODEL=([base]=$D/sft/model [mdpo-s0]=$D/dpo/model [mdpo-s1]=$O/dpo-seed1/model [mdpo-s2]=$O/dpo-seed2/model
                  [plain-s0]=$O/dpo-plain/model [plain-s1]=$O/dpo-plain-seed1/model [plain-s2]=$O/dpo-plain-seed2/model
                  [other-s0]=$O/dpo-other-image-seed0/model [other-s1]=$O/dpo-other-image-seed1/model [other-s2]=$O/dpo-other-image-seed2/model)
for name in base mdpo-s0 mdpo-s1 mdpo-s2 plain-s0 plain-s1 plain-s2 other-s0 other-s1 other-s2; do
  [ -f $O/larger-pope-$name/eval.json ] || $V eval --model=${MODEL[$name]} --suite.data=$W --suite.parts='[pope]' --suite.pope_questions=0 --suite.kl_prompts=0 --output_dir=$O/larger-pope-$name --progress=false > /dev/null
  [ -f $O/larger-heldout-$name/eval.json ] || $V eval --model=${MODEL[$name]} --suite.data=$W --suite.parts='[heldout]' --suite.describe=0 --suite.questions_per_task=0 --suite.kl_prompts=0 --output_dir=$O/larger-heldout-$name --progress=false > /dev/null
done
both() { for s in 0 1 2; do printf '%s,' "$O/larger-$1-$2-s$s"; done | sed 's/,$//'; }
for part in pope heldout; do
  metrics=$([ $part = pope ] && echo pope/adversarial || echo chair/chair_i,task)
  for s in 0 1 2; do
    echo "== $part, seed $s: mDPO - plain DPO"; $V compare $O/larger-$part-mdpo-s$s $O/larger-$part-plain-s$s --metrics=$metrics | tail -n +4
    for v in plain mdpo; do echo "== $part, seed $s: $v - base"; $V compare $O/larger-$part-$v-s$s $O/larger-$part-base --metrics=$metrics | tail -n +4; done
  done
  echo "== $part, seeds 0-2 pooled: mDPO - plain DPO"; $V compare --a=$(both $part mdpo) --b=$(both $part plain) --metrics=$metrics | tail -n +4
  echo "== $part, seeds 0-2 pooled: mDPO with another scene's image - plain DPO"; $V compare --a=$(both $part other) --b=$(both $part plain) --metrics=$metrics | tail -n +4
done
