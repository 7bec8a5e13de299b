#!/bin/bash
# The measured runs of issues 6 and 7 beyond the demo, from a finished demo folder (its world,
# base model and pairs): plain DPO beside the demo's mDPO (same pairs, NLL term, steps and lr), the
# demo's DPO stage with seeds 1 and 2, a fact-augmented reward model on description pairs (injected
# hallucinations, and the base model's own sampled descriptions ranked against the scene), and PPO
# with that reward model.
#   make demo && bash benchmarks/alignment_runs.sh runs/demo      # writes runs/final/
# Read the numbers from runs/final/eval-dpo-plain/eval.json and eval-dpo-seed{1,2}/eval.json (against
# runs/demo/eval-dpo/eval.json),
# runs/final/rm-facts/metrics.jsonl (eval/accuracy) and runs/final/eval-ppo/eval.json (the PPO
# policy beside the base model on the demo's suite, with the reward model's win rate), and
# runs/final/eval-ppo-tasks/eval.json (PPO on descriptions and short answers, a reward per task).
set -x
D=${1:-runs/demo}; W=$D/world; BASE=$D/sft/model; O=runs/final
export HF_HUB_OFFLINE=1
V=.venv/bin/vlalign
mkdir -p $O
# mDPO vs plain DPO (both + NLL, same pairs, steps and lr as the demo)
$V dpo --model.name_or_path=$BASE --data.train=$D/pairs/train.jsonl --data.eval= --loss.weights='{sigmoid: 1.0, nll: 1.0}' --loss.beta=0.1 --train.max_steps=250 --train.batch_size=16 --train.lr=5e-5 --train.save_every=0 --train.log_every=10 --train.output_dir=$O/dpo-plain --train.overwrite=true --train.progress=false
$V eval --model=$O/dpo-plain/model --reference=$BASE --suite.data=$W --suite.describe=500 --suite.questions_per_task=500 --suite.pope_questions=1500 --output_dir=$O/eval-dpo-plain --progress=false | grep -E "^(pope/adv|chair/chair_i|task/|kl/seq)"
# the demo's DPO stage with two other seeds (data order, corruption, dropout): the spread of its numbers
for seed in 1 2; do
  $V dpo --model.name_or_path=$BASE --data.train=$D/pairs/train.jsonl --data.eval= --loss.weights='{mdpo: 1.0, nll: 1.0}' --loss.options='{mdpo: {conditional_weight: 0.5}}' --loss.beta=0.1 --train.max_steps=250 --train.batch_size=16 --train.lr=5e-5 --train.seed=$seed --train.save_every=0 --train.log_every=10 --train.output_dir=$O/dpo-seed$seed --train.overwrite=true --train.progress=false
  $V eval --model=$O/dpo-seed$seed/model --reference=$BASE --suite.data=$W --suite.describe=500 --suite.questions_per_task=500 --suite.pope_questions=1500 --output_dir=$O/eval-dpo-seed$seed --progress=false | grep -E "^(pope/adv|chair/chair_i|task/|kl/seq)"
done
# reward model (fact-augmented) on description pairs, then PPO with it
$V pairs --method=inject --data=$W/train.jsonl --out=$O/pairs/describe_train.jsonl --inject.tasks='[describe]' --inject.pairs_per_sample=2 --limit=3000 | tail -3
$V pairs --method=inject --data=$W/validation.jsonl --out=$O/pairs/describe_validation.jsonl --inject.tasks='[describe]' --inject.pairs_per_sample=2 | tail -3
for s in train validation; do  # the base model's own descriptions, 8 samples each, ranked against the scene
  $V pairs --method=rank --data=$W/${s}_prompts.jsonl --tasks='[describe]' --out=$O/pairs/describe_rank_$s.jsonl --rank.model=$BASE --rank.n=8 --rank.scorer=ground_truth --rank.max_new_tokens=40 --rank.pairing=all --rank.max_pairs_per_prompt=3 --limit=3000 --progress=false | tail -1
  cat $O/pairs/describe_$s.jsonl $O/pairs/describe_rank_$s.jsonl > $O/pairs/describe_rm_$s.jsonl
done
$V rm --config examples/rm_shapes_facts.yaml --model.name_or_path=$BASE --data.train=$O/pairs/describe_rm_train.jsonl --data.eval=$O/pairs/describe_rm_validation.jsonl --train.output_dir=$O/rm-facts --train.overwrite=true --train.max_steps=300 --train.eval_every=150 --train.save_every=150 --train.progress=false
$V ppo --config examples/ppo_shapes.yaml --model.name_or_path=$BASE --reward_model=$O/rm-facts/model --data.train=$W/train_prompts.jsonl --eval.data=$W --train.output_dir=$O/ppo --train.overwrite=true --train.save_every=50 --train.progress=false
$V eval --model=$O/ppo/model --baseline=$BASE --scorer=$O/rm-facts/model --suite.data=$W --suite.describe=500 --suite.questions_per_task=500 --suite.pope_questions=1500 --output_dir=$O/eval-ppo --progress=false | grep -E "^(win_rate|pope/adv|chair/chair_i|chair/recall|task/|kl/seq)"
# PPO on descriptions (reward model) and colour / existence questions (verifiable reward)
$V ppo --config examples/ppo_shapes.yaml --model.name_or_path=$BASE --reward_model=$O/rm-facts/model --data.train=$W/train_prompts.jsonl --eval.data=$W --ppo.tasks='[describe, colour, existence]' --rewards.weights='{reward_model: 1.0, shapes_answer: 1.0}' --rewards.tasks='{reward_model: [describe], shapes_answer: [colour, existence]}' --train.max_steps=150 --train.output_dir=$O/ppo-tasks --train.overwrite=true --train.save_every=50 --train.progress=false
$V eval --model=$O/ppo-tasks/model --baseline=$BASE --scorer=$O/rm-facts/model --suite.data=$W --suite.describe=500 --suite.questions_per_task=500 --suite.pope_questions=1500 --output_dir=$O/eval-ppo-tasks --progress=false | grep -E "^(win_rate|pope/adv|chair/chair_i|chair/recall|task/|kl/seq)"
