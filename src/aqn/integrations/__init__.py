"""Adapters that carry aqn's AQN into other engines (layer 9: nothing below imports these).

``aqn.integrations.trl``: TRL's ``GRPOTrainer`` (HF generation, or vLLM colocated).
``aqn.integrations.verl``: verl's rollout weight sync, configured by ``trainer.noise_injection``.

Both reuse ``aqn.noise.NoiseInjector`` on the engine's own model, so the count of targeted
norms, the effective std after the cast and the refusal to match nothing are aqn's; the AQN
block is resolved by ``aqn.config.resolve_noise``, and inside vLLM's workers it is
``aqn.rollout.vllm_worker``'s extension that applies it, as for aqn's own vLLM engine.
"""

