#!/usr/bin/env bash
# The seed's system: GRPO on GSM8K with verl 0.9.1 + vLLM, Qwen2.5-1.5B-Instruct, 8 GPUs,
# AQN on vLLM's RMSNorm weights (README.md beside this file). Extra verl overrides pass
# through: ./run_qwen2_5_1_5b_gsm8k_aqn.sh trainer.experiment_name=aqn-seed2 ...
set -euo pipefail
DATA=${DATA:-$HOME/data/gsm8k}        # verl's examples/data_preprocess/gsm8k.py writes here
MODEL=${MODEL:-Qwen/Qwen2.5-1.5B-Instruct}
STEPS=${STEPS:-232}                   # 2 epochs of 7473 prompts at batch 64
SEED=${SEED:-1}
RUN=${RUN:-aqn-qerl-seed$SEED}
export VERL_FILE_LOGGER_PATH=${VERL_FILE_LOGGER_PATH:-$PWD/runs/verl/$RUN.jsonl}
mkdir -p "$(dirname "$VERL_FILE_LOGGER_PATH")"

python3 -m aqn.integrations.verl \
    algorithm.adv_estimator=grpo \
    algorithm.use_kl_in_reward=false \
    data.train_files=$DATA/train.parquet \
    data.val_files=$DATA/test.parquet \
    data.train_batch_size=64 \
    data.max_prompt_length=512 \
    data.max_response_length=1024 \
    actor_rollout_ref.model.path=$MODEL \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=64 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.actor.use_kl_loss=true \
    actor_rollout_ref.actor.kl_loss_coef=0.001 \
    actor_rollout_ref.actor.kl_loss_type=low_var_kl \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.calculate_log_probs=true \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16 \
    trainer.logger='[console,file]' \
    trainer.project_name=aqn \
    trainer.experiment_name=$RUN \
    trainer.n_gpus_per_node=8 \
    trainer.nnodes=1 \
    trainer.test_freq=20 \
    trainer.save_freq=-1 \
    trainer.total_training_steps=$STEPS \
    +trainer.noise_injection.enabled=true \
    +trainer.noise_injection.preset=qerl \
    +trainer.noise_injection.seed=$SEED \
    "$@"
