"""User rewards for test_rl (loaded as module:function)."""


def always_one(prompts, completions, **fields):
    return [1.0 for _ in completions]


def broken(prompts, completions, **fields):
    return [1 / 0]


def short(prompts, completions, **fields):
    return [0.0]


def variety(prompts, completions, **fields):
    """Distinct characters per completion: differs within a group even for an untrained model."""
    return [len(set(c)) / 10 for c in completions]
