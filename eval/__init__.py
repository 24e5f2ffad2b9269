"""dlm.eval: evaluation (docs/likelihoods.md) and benchmarks.

Importing ``dlm.eval`` registers the lm-eval-harness model ``dlm`` (:mod:`dlm.eval.harness`)
when lm-eval is installed (``pip install "dlm[eval]"``). Likelihood bounds live in
:mod:`dlm.eval.likelihood`, offline lm-eval tasks in :mod:`dlm.eval.tasks`, benchmarks in
``bench_train`` / ``bench_decode``.
"""

try:
    from dlm.eval import harness  # noqa: F401  (registers lm-eval's "dlm" model)
except ModuleNotFoundError as exc:  # lm-eval is an optional extra
    if not (exc.name or "").startswith("lm_eval"):
        raise
