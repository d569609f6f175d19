"""Strict closed-set answer accuracy for surgical VQA, as a Hugging Face `evaluate` metric.

Load offline with ``evaluate.load("<path to this directory>")``. The rule itself lives in ``surgvqa.metrics``
(see EVAL_STRATEGY.md); this module only adapts it to the `evaluate` interface.
"""

from __future__ import annotations

import datasets
import evaluate

from surgvqa.metrics import UNTYPED, build_candidates, strict_hit, wilson_interval

_DESCRIPTION = """Strict accuracy: per question type, the closed set of candidate short answers seen in the gold
data. Yes/no types are decided by the leading yes/no word of the prediction; other types by the single candidate
the prediction states (word boundaries, morphological variants, negated mentions ignored). Two different
candidates stated, no candidate stated, or an empty prediction = wrong."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated answers.
    references (`list` of `str`): gold short answers (e.g. "yes", "upper-left", "<5").
    question_types (`list` of `str`, optional): question type of each sample; candidates are gathered per type.
        Without it every sample shares one type.
    candidates (`dict` type -> `list` of `str`, optional): closed answer sets; default gathered from references.
Returns:
    accuracy (`float`): fraction of strict hits, n (`int`), hits (`int`), ci95 (`list`): Wilson 95% interval.
Examples:
    >>> metric = evaluate.load("surgvqa/metrics_modules/surgvqa_accuracy")
    >>> metric.compute(predictions=["No, it is not."], references=["no"], question_types=["scope_motion"])
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SurgvqaAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, question_types=None, candidates=None):
        types = list(question_types) if question_types is not None else [UNTYPED] * len(references)
        if len(types) != len(references):
            raise ValueError(f"{len(types)} question_types for {len(references)} references")
        if candidates is None:
            candidates = build_candidates(zip(types, references, strict=True))
        hits = sum(
            strict_hit(p, r, candidates.get(t or UNTYPED, [r]))
            for p, r, t in zip(predictions, references, types, strict=True)
        )
        n = len(references)
        lo, hi = wilson_interval(hits, n)
        return {"accuracy": hits / n if n else 0.0, "n": n, "hits": hits, "ci95": [lo, hi]}
