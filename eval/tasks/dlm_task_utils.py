"""Scorers of dlm's local lm-eval tasks. :func:`dlm.eval.tasks.materialize` copies this file next
to the task YAMLs, which name it (``process_results: !function dlm_task_utils.repeat_results``)."""

from dlm.tasks import score


def repeat_results(doc, results):
    completion = results[0]
    return {
        "exact_match": float(completion.split() == doc["response"].split()),
        "letter_accuracy": score("repeat", doc, completion),
    }
