"""SurgViVQA keyword accuracy (K-ACC), as a Hugging Face `evaluate` metric.

Load offline with ``evaluate.load("<path to this directory>")``. The rule itself lives in ``surgvqa.metrics``
(``k_acc_hit``); this module only adapts it to the `evaluate` interface.
"""

from __future__ import annotations

import datasets
import evaluate

from surgvqa.metrics import k_acc_hit

_DESCRIPTION = """Keyword accuracy as in the SurgViVQA paper: lower-case prediction and short answer; keywords =
short_answer.split(','); only samples with exactly one keyword are counted; a single-word keyword matches by the
regex \\bkw\\b, a phrase (contains a space) by plain substring. Lenient and blind to negation ("not up" matches
"up"); even the gold long answers of REAL-Colon-VQA score 93.08% under it."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated answers.
    references (`list` of `str`): gold short answers.
Returns:
    k_acc (`float` or None when no sample is counted), n_counted (`int`), hits (`int`), n (`int`).
"""

_CITATION = """@article{drago2025surgvivqa, title={SurgViVQA: Temporally-Grounded Video Question Answering for
Surgical Scene Understanding}, author={Drago, Mauro Orazio and others}, journal={arXiv:2511.03325}, year={2025}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class KAcc(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        results = [k_acc_hit(p, r) for p, r in zip(predictions, references, strict=True)]
        counted = [h for h in results if h is not None]
        hits = sum(counted)
        return {
            "k_acc": hits / len(counted) if counted else None,
            "n_counted": len(counted),
            "hits": hits,
            "n": len(results),
        }
