"""dlm.train.rl: RL fine-tuning of diffusion LMs (docs/rl.md).

* :mod:`~dlm.train.rl.rewards` — reward functions ``(prompts, completions, **fields) -> list[float]``
  in a registry, with validation that names the function at fault;
* :mod:`~dlm.train.rl.estimators` — log-probability rows of a rollout behind one interface
  (masked inputs + target masks + weights): trajectory (TraceRL, ``shrink``), one-step with random
  prompt masking (diffu-GRPO), coupled complementary masks (coupled-GRPO);
* :mod:`~dlm.train.rl.loss` — group-relative advantages and the per-token clipped policy loss as
  pure functions.
"""
