"""Answer metrics for surgical VQA: pure functions of (prediction, gold), plus the summary built from them.

Every rule here is written out, with its tricky cases, in EVAL_STRATEGY.md. This module imports nothing from
surgvqa but the leaf ``surgvqa.stats`` (intervals, exact McNemar; re-exported here), so the evaluator, the
training callback and offline re-scoring all share exactly one definition.

- ``accuracy`` (primary, strict): closed set of candidate short answers per question type. Yes/no types are
  decided by the leading yes/no word; other types by the one candidate the prediction states (word boundaries,
  morphological variants, negated mentions ignored, two different candidates = wrong).
- ``k_acc``: the SurgViVQA paper's keyword accuracy, reproduced exactly (for comparison with the paper).
- ``substring``: the original toolkit's ``short_answer in prediction`` (for comparison only; it is lenient).
- ``exact_match``, BLEU-4, ROUGE-L, METEOR: text similarity to the long gold answer.
- ``summarize`` (a run's summary) and ``paired_comparison`` (two runs on the same samples, paired by key).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from surgvqa.clusters import Clustering, assign, clustered_pairs, clustered_summary
from surgvqa.errors import UserError
from surgvqa.stats import PAIRED_ALPHA, PAIRED_INTERVAL, PAIRED_TEST, paired_stats, wilson_interval

# Re-exported: the paired statistics live in the leaf surgvqa.stats, importable from here as before.
from surgvqa.stats import mcnemar_exact_p as mcnemar_exact_p
from surgvqa.stats import paired_difference_interval as paired_difference_interval

YES_NO: tuple[str, str] = ("no", "yes")
UNTYPED = "<untyped>"
NONE_LABEL = "<none>"
AMBIGUOUS_LABEL = "<ambiguous>"
COLLAPSE_SHARE = 0.90
SCORING_VERSION = "surgvqa-strict-1"

# Left/right boundary for word-like candidates: no letter, digit, underscore or hyphen next to the mention, so
# "up" is not found in "upper-left" and "left" is not found in "lower-left".
_LB = r"(?<![\w-])"
_RB = r"(?![\w-])"
# A number must not continue ("<5" must not match "<50" or "<5.5").
_NUM_END = r"(?!\.?\d)"

# Morphological variants / unambiguous spellings of the known short answers (keys lower-case). The candidate's
# own spelling is always accepted too. Each entry is a regex body without boundaries.
_VARIANTS: dict[str, tuple[str, ...]] = {
    "up": (r"up(?:wards?)?",),
    "down": (r"down(?:wards?)?",),
    "left": (r"left(?:wards?)?",),
    "right": (r"right(?:wards?)?",),
    "upper-left": (r"(?:upper|top)[-\s]?left",),
    "upper-right": (r"(?:upper|top)[-\s]?right",),
    "lower-left": (r"(?:lower|bottom)[-\s]?left",),
    "lower-right": (r"(?:lower|bottom)[-\s]?right",),
    "complete": (r"complete(?:ly)?",),
    "absent": (r"absen(?:t|ce)",),
    "stable": (r"stabl[ey]",),
    "advancing": (r"advanc(?:e|es|ed|ing)",),
    "withdrawing": (r"withdr(?:aw|aws|awn|awing|awal|ew)",),
    "adenoma": (r"adenoma(?:s|tous)?",),
    "hyperplastic": (r"hyperplastic", r"hyperplasia"),
    "catheter": (r"catheters?",),
    "snare": (r"snares?",),
    "forceps": (r"forceps",),
    "sigma": (r"sigma", r"sigmoid"),
    "rectum": (r"rectum", r"rectal"),
    "nbi": (r"nbi", r"narrow[-\s]band\s+imaging"),
}
# Candidates that are not word-like get their own boundaries.
_SPECIAL: dict[str, tuple[str, ...]] = {
    "<5": (
        r"<\s*5" + _NUM_END,
        _LB + r"(?:less|smaller)\s+than\s+(?:5" + _NUM_END + r"|five" + _RB + r")",
        _LB + r"(?:under|below)\s+(?:5" + _NUM_END + r"|five" + _RB + r")",
    ),
}
# Compound screen positions: a mention of "upper right" is never a mention of "right" (or "up"), even in a type
# whose candidates are only up/down/left/right. These spans shadow shorter matches and never count themselves.
_SHADOWS: tuple[str, ...] = (_LB + r"(?:upper|lower|top|bottom)[-\s]?(?:left|right)" + _RB,)

# Negation: a candidate mention preceded, within the same clause and at most 3 words back, by one of these is
# not stated ("moving up, not down" states up; "no snare, forceps" states forceps).
_NEG_WORDS = frozenset({"not", "no", "never", "without", "nor", "neither", "none", "cannot", "non", "except"})
_NEG_BIGRAMS = frozenset({"rather than", "instead of", "other than"})
_NEG_WINDOW = 3
_CLAUSE_BREAK = re.compile(r"[,;.:!?()\[\]]|\bbut\b|\bwhile\b|\bwhereas\b|\bhowever\b")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_LEADING_WORD = re.compile(r"[^a-z0-9]*([a-z]+)")


def _norm_key(text: str) -> str:
    return text.strip().lower()


def is_yes_no(candidates: Iterable[str]) -> bool:
    """A type is yes/no when every candidate is yes or no."""
    keys = {_norm_key(c) for c in candidates}
    return bool(keys) and keys <= set(YES_NO)


def build_candidates(golds: Iterable[tuple[str | None, str]]) -> dict[str, list[str]]:
    """Closed answer set per question type from (question_type, short_answer) pairs of the gold data.

    Candidates are de-duplicated case-insensitively (first spelling kept) and sorted. A type whose answers are
    only yes/no always gets both, so a type whose gold happens to be all "no" is still a yes/no question.
    A missing question type is grouped under ``UNTYPED``.
    """
    seen: dict[str, dict[str, str]] = defaultdict(dict)
    for qtype, short in golds:
        if short is None or not str(short).strip():
            continue
        short = str(short).strip()
        seen[qtype or UNTYPED].setdefault(_norm_key(short), short)
    out: dict[str, list[str]] = {}
    for qtype, by_key in seen.items():
        if set(by_key) <= set(YES_NO):
            for yn in YES_NO:
                by_key.setdefault(yn, yn)
        out[qtype] = sorted(by_key.values(), key=_norm_key)
    return out


@lru_cache(maxsize=4096)
def _patterns_for(candidate: str) -> tuple[re.Pattern[str], ...]:
    key = _norm_key(candidate)
    if key in _SPECIAL:
        return tuple(re.compile(p) for p in _SPECIAL[key])
    bodies = list(_VARIANTS.get(key, ()))
    generic = r"[-\s]+".join(re.escape(part) for part in re.split(r"[-\s]+", key))
    bodies.append(generic)
    left = _LB if re.match(r"\w", key) else ""
    right = _RB if re.search(r"\w$", key) else ""
    return tuple(re.compile(left + body + right) for body in bodies)


def _negated(text: str, start: int) -> bool:
    clause = _CLAUSE_BREAK.split(text[:start])[-1]
    words = _WORD.findall(clause)[-_NEG_WINDOW:]
    if any(w in _NEG_WORDS or w.endswith("n't") for w in words):
        return True
    return any(f"{a} {b}" in _NEG_BIGRAMS for a, b in zip(words, words[1:], strict=False))


def stated_answers(prediction: str | None, candidates: Sequence[str]) -> list[str]:
    """Candidates the prediction states, in order of first mention, without duplicates.

    Yes/no types: the leading word of the prediction, if it is "yes" or "no" ("Not visible" and "Nothing" state
    nothing). Other types: every non-negated mention of a candidate or of one of its variants; where mentions
    overlap the longest wins, so "upper-left" never also counts as "up" or "left".
    """
    if prediction is None:
        return []
    text = str(prediction).lower().replace("\u2019", "'")
    if not text.strip():
        return []
    if is_yes_no(candidates):
        m = _LEADING_WORD.match(text)
        word = m.group(1) if m else ""
        if word not in YES_NO:
            return []
        return [next((c for c in candidates if _norm_key(c) == word), word)]
    spans: list[tuple[int, int, str | None]] = []
    for cand in (c for c in candidates if c.strip()):
        for pat in _patterns_for(cand):
            spans.extend((m.start(), m.end(), cand) for m in pat.finditer(text))
    for shadow in _SHADOWS:
        spans.extend((m.start(), m.end(), None) for m in re.finditer(shadow, text))
    # Longest span first; at equal length a real candidate beats a shadow.
    spans.sort(key=lambda s: (-(s[1] - s[0]), s[2] is None, s[0]))
    taken: list[tuple[int, int, str | None]] = []
    for span in spans:
        if all(span[1] <= t[0] or span[0] >= t[1] for t in taken):
            taken.append(span)
    stated: list[str] = []
    for start, _end, cand in sorted(taken):
        if cand is not None and cand not in stated and not _negated(text, start):
            stated.append(cand)
    return stated


def _with_gold(candidates: Sequence[str], short_answer: str) -> list[str]:
    cands = list(candidates)
    if _norm_key(short_answer) not in {_norm_key(c) for c in cands}:
        cands.append(short_answer.strip())
        if is_yes_no(cands):
            cands = list(YES_NO)
    return cands


def predicted_label(prediction: str | None, candidates: Sequence[str]) -> str:
    """The one candidate stated, or ``NONE_LABEL`` / ``AMBIGUOUS_LABEL``."""
    stated = stated_answers(prediction, candidates)
    if not stated:
        return NONE_LABEL
    if len(stated) > 1:
        return AMBIGUOUS_LABEL
    return stated[0]


def strict_hit(prediction: str | None, short_answer: str, candidates: Sequence[str]) -> bool:
    """Strict accuracy: the prediction states exactly one candidate and it is the gold short answer."""
    if not short_answer.strip():
        return False
    stated = stated_answers(prediction, _with_gold(candidates, short_answer))
    return len(stated) == 1 and _norm_key(stated[0]) == _norm_key(short_answer)


def k_acc_hit(prediction: str | None, short_answer: str) -> bool | None:
    """SurgViVQA keyword accuracy, exactly as in the paper; None when the sample is not counted.

    Lower-case both; keywords = short_answer.split(','); only samples with exactly one keyword count; a single
    word matches by ``\\bkw\\b``, a phrase (contains a space) by plain substring.
    """
    pred = (prediction or "").lower()
    keywords = short_answer.lower().split(",")
    if len(keywords) != 1:
        return None
    kw = keywords[0]
    if " " in kw:
        return kw in pred
    return re.search(r"\b" + re.escape(kw) + r"\b", pred) is not None


def substring_hit(prediction: str | None, short_answer: str) -> bool:
    """The original toolkit's rule: ``short_answer.lower() in prediction.lower()`` (lenient: "no" in "not")."""
    return short_answer.lower() in (prediction or "").lower()


def normalize_text(text: str | None) -> str:
    """Lower-case, collapse whitespace, strip, drop trailing periods."""
    return " ".join((text or "").lower().split()).rstrip(".").rstrip()


def exact_match_hit(prediction: str | None, answer: str) -> bool:
    return normalize_text(prediction) == normalize_text(answer)


def bleu4(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU-4 (sacrebleu, tokenize 13a) as a fraction in 0-1; 0.0 for no samples."""
    if len(preds) != len(refs):
        raise ValueError(f"bleu4: {len(preds)} predictions vs {len(refs)} references")
    if not preds:
        return 0.0
    import sacrebleu

    score = sacrebleu.corpus_bleu([p or "" for p in preds], [[r or "" for r in refs]], tokenize="13a").score
    return min(1.0, max(0.0, score / 100.0))  # clamp float noise (identical text gives 1.0000000000000004)


def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge_score, default tokenizer, no stemming) in 0-1; 0.0 for no samples."""
    if len(preds) != len(refs):
        raise ValueError(f"rouge_l: {len(preds)} predictions vs {len(refs)} references")
    if not preds:
        return 0.0
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return math.fsum(  # fsum: exact, so the mean does not depend on the order of the samples
        scorer.score(r or "", p or "")["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)
    ) / len(preds)


def meteor_unavailable_reason() -> str | None:
    """Why METEOR cannot be computed offline here, or None when it can. Never downloads anything."""
    try:
        from nltk.corpus import wordnet
        from nltk.translate.meteor_score import meteor_score  # noqa: F401
    except ImportError:
        return "nltk is not installed"
    try:
        wordnet.synsets("colon")
    except (LookupError, OSError):
        return "nltk is installed but its wordnet data is not available offline (never downloaded here)"
    return None


def meteor(preds: Sequence[str], refs: Sequence[str]) -> float | None:
    """Mean NLTK METEOR (whitespace tokens) in 0-1, or None when nltk/wordnet is unavailable offline."""
    if len(preds) != len(refs):
        raise ValueError(f"meteor: {len(preds)} predictions vs {len(refs)} references")
    if meteor_unavailable_reason() is not None:
        return None
    if not preds:
        return 0.0
    from nltk.translate.meteor_score import meteor_score

    try:
        scores = [
            meteor_score([(r or "").split()], (p or "").split()) for p, r in zip(preds, refs, strict=True)
        ]
    except (LookupError, OSError):
        return None
    return math.fsum(scores) / len(scores)


def _union(given: Iterable[str], golds: Iterable[str]) -> list[str]:
    """``given`` plus each gold answer it lacks (case-insensitive), sorted; a yes/no set stays exactly yes/no."""
    out = list(given)
    for gold in golds:
        out = _with_gold(out, gold)
    return sorted(out, key=_norm_key)


def question_type(record: Mapping[str, Any]) -> str:
    """A record's question type (UNTYPED when it has none)."""
    return record.get("question_type") or UNTYPED


def _candidates_for(record: Mapping[str, Any], candidates: Mapping[str, Sequence[str]]) -> list[str]:
    cands = candidates.get(question_type(record))
    if not cands:
        # Unknown type: only the gold answer is known (plus yes/no completion).
        qtype = question_type(record)
        cands = build_candidates([(qtype, str(record["short_answer"]))]).get(qtype, [])
    return _with_gold(cands, str(record["short_answer"]))


def score_record(
    record: Mapping[str, Any], candidates: Mapping[str, Sequence[str]]
) -> dict[str, bool | None]:
    """Per-metric hits for one predictions record (needs question_type, short_answer, answer, prediction)."""
    prediction = record.get("prediction") or ""
    short = str(record["short_answer"])
    return {
        "accuracy": strict_hit(prediction, short, _candidates_for(record, candidates)),
        "k_acc": k_acc_hit(prediction, short),
        "substring": substring_hit(prediction, short),
        "exact_match": exact_match_hit(prediction, str(record.get("answer") or "")),
    }


def _frac(k: int, n: int) -> float | None:
    return k / n if n else None


def parse_baseline(value: str | float) -> str | float:
    """``--baseline``: "majority", "chance" or a fraction in [0, 1] (``46`` is refused: write ``0.46``)."""
    if value in ("majority", "chance"):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"--baseline must be 'majority', 'chance' or a number in [0, 1], got {value!r}") from None
    if not 0 <= number <= 1:
        raise UserError(f"--baseline {number} is not a fraction in [0, 1] (write 0.46, not 46)")
    return number


def closed_sets(records: Sequence[Mapping[str, Any]],
                candidates: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """The closed answer set of each type that ``summarize`` scores ``records`` with, fixed before any is
    scored: ``candidates`` (default: the gold short answers) plus any gold answer it lacks (``candidates`` is
    not modified)."""
    gold_sets = build_candidates((r.get("question_type"), str(r["short_answer"])) for r in records)
    if candidates is None:
        candidates = gold_sets
    types = {*candidates, *gold_sets, *(question_type(r) for r in records)}  # a type whose golds are all blank too
    return {t: _union(candidates.get(t, ()), gold_sets.get(t, ())) for t in types}


def summarize(
    records: Iterable[Mapping[str, Any]],
    baseline: str | float = "majority",
    candidates: Mapping[str, Sequence[str]] | None = None,
    clustering: Clustering | None = None,
) -> dict[str, Any]:
    """Summary of a predictions file; a pure function of the records (hits are always re-computed); "clustered":
    ``surgvqa.clusters.clustered_summary`` under ``clustering`` (default: segments, 30 frames).

    baseline: "majority" (overall majority-class accuracy = sum over types of the most frequent gold answer's
    count / n), "chance" (sum over types of n_type / n_candidates / n) or a number in 0-1.
    candidates: closed answer sets per type; by default gathered from the records' gold short answers.
    """
    recs = list(records)
    if not recs:
        raise UserError("summarize: no records")
    candidates = closed_sets(recs, candidates)

    hits: Counter[str] = Counter()
    k_n = 0
    by_type: dict[str, dict[str, Any]] = {}
    no_eos = eos_unknown = 0
    new_tokens: list[float] = []
    latencies: list[float] = []
    preds: list[str] = []
    refs: list[str] = []
    scores: list[dict[str, bool | None]] = []
    for rec in recs:
        qtype = question_type(rec)
        cands = candidates[qtype]
        score = score_record(rec, candidates)
        scores.append(score)
        prediction = rec.get("prediction") or ""
        short = _norm_key(str(rec["short_answer"]))
        gold = next((c for c in cands if _norm_key(c) == short), rec["short_answer"])
        t = by_type.setdefault(
            qtype, {"n": 0, "hits": 0, "gold": Counter(), "pred": Counter(), "k": 0, "kn": 0}
        )
        t["n"] += 1
        t["hits"] += bool(score["accuracy"])
        t["gold"][gold] += 1
        t["pred"][predicted_label(prediction, cands)] += 1
        hits["accuracy"] += bool(score["accuracy"])
        hits["substring"] += bool(score["substring"])
        hits["exact_match"] += bool(score["exact_match"])
        if score["k_acc"] is not None:
            k_n += 1
            t["kn"] += 1
            hits["k_acc"] += bool(score["k_acc"])
            t["k"] += bool(score["k_acc"])
        eos = rec.get("stopped_by_eos")
        if eos is False:
            no_eos += 1
        elif eos is None:
            eos_unknown += 1
        if isinstance(rec.get("new_tokens"), int | float):
            new_tokens.append(float(rec["new_tokens"]))
        if isinstance(rec.get("latency_ms"), int | float):
            latencies.append(float(rec["latency_ms"]))
        preds.append(prediction)
        refs.append(str(rec.get("answer") or ""))

    n = len(recs)
    per_type: dict[str, dict[str, Any]] = {}
    majority_hits = 0
    chance_sum = 0.0
    for qtype in sorted(by_type):
        t = by_type[qtype]
        cands = candidates[qtype]
        top_gold, top_gold_n = sorted(t["gold"].items(), key=lambda kv: (-kv[1], _norm_key(kv[0])))[0]
        majority_hits += top_gold_n
        chance = 1.0 / len(cands) if cands else 0.0
        chance_sum += t["n"] * chance
        real = [(a, c) for a, c in t["pred"].items() if a not in (NONE_LABEL, AMBIGUOUS_LABEL)]
        top_pred, top_pred_n = sorted(t["pred"].items(), key=lambda kv: (-kv[1], kv[0]))[0]
        top_real_n = max((c for _a, c in real), default=0)
        collapse = len(t["gold"]) >= 2 and top_real_n / t["n"] > COLLAPSE_SHARE
        lo, hi = wilson_interval(t["hits"], t["n"])
        per_type[qtype] = {
            "n": t["n"],
            "hits": t["hits"],
            "accuracy": t["hits"] / t["n"],
            "ci95": [lo, hi],
            "majority_baseline": top_gold_n / t["n"],
            "majority_answer": top_gold,
            "chance_baseline": chance,
            "candidates": list(cands),
            "gold_distribution": dict(sorted(t["gold"].items())),
            "predicted_distribution": dict(sorted(t["pred"].items(), key=lambda kv: (-kv[1], kv[0]))),
            "top_predicted": top_pred,
            "top_predicted_share": top_pred_n / t["n"],
            "collapse": collapse,
            "k_acc": _frac(t["k"], t["kn"]),
            "k_acc_n": t["kn"],
        }

    majority = majority_hits / n
    chance_overall = chance_sum / n
    if baseline == "majority":
        base_value, base_kind = majority, "majority"
    elif baseline == "chance":
        base_value, base_kind = chance_overall, "chance"
    elif isinstance(baseline, int | float) and not isinstance(baseline, bool):
        base_value, base_kind = float(baseline), "fixed"
    else:
        raise UserError(f"summarize: baseline must be 'majority', 'chance' or a number, got {baseline!r}")

    accuracy = hits["accuracy"] / n
    lo, hi = wilson_interval(hits["accuracy"], n)
    meteor_reason = meteor_unavailable_reason()
    return {
        "scoring": SCORING_VERSION,
        "n": n,
        "accuracy": accuracy,
        "accuracy_hits": hits["accuracy"],
        "accuracy_ci95": [lo, hi],
        "k_acc": _frac(hits["k_acc"], k_n),
        "k_acc_n": k_n,
        "substring_acc": hits["substring"] / n,
        "exact_match": hits["exact_match"] / n,
        "bleu4": bleu4(preds, refs),
        "rouge_l": rouge_l(preds, refs),
        "meteor": None if meteor_reason else meteor(preds, refs),
        "meteor_unavailable": meteor_reason,
        "baseline": base_value,
        "baseline_kind": base_kind,
        "delta_vs_baseline": accuracy - base_value,
        "majority_baseline": majority,
        "chance_baseline": chance_overall,
        "no_eos": no_eos,
        "eos_unknown": eos_unknown,
        "mean_new_tokens": math.fsum(new_tokens) / len(new_tokens) if new_tokens else None,
        "mean_latency_ms": math.fsum(latencies) / len(latencies) if latencies else None,
        "n_types": len(per_type),
        "collapsed_types": [t for t, v in per_type.items() if v["collapse"]],
        "per_type": per_type,
        "clustered": clustered_summary(recs, scores, [question_type(r) for r in recs], clustering or Clustering()),
        "candidates": {t: candidates[t] for t in sorted(candidates)},
    }


# ------------------------------------------------------------------------------------------ paired comparison
_LISTED_KEYS = 10


def _record_key(record: Mapping[str, Any]) -> tuple[str | None, str]:
    return (record.get("video_id") or None, str(record["id"]))


def _keyed(records: Iterable[Mapping[str, Any]], label: str) -> dict[tuple[str | None, str], Mapping[str, Any]]:
    out: dict[tuple[str | None, str], Mapping[str, Any]] = {}
    for rec in records:
        key = _record_key(rec)
        if key in out:
            raise UserError(
                f"paired comparison: the {label} has two records for (video_id, id) = {key}; a pairing needs "
                "one record per sample (re-run the evaluation without --resume into a mixed file)"
            )
        out[key] = rec
    return out


def _key_list(keys: Iterable[tuple[str | None, str]]) -> dict[str, Any]:
    keys = sorted(keys, key=lambda k: (k[0] or "", k[1]))
    return {"n": len(keys), "examples": [list(k) for k in keys[:_LISTED_KEYS]]}


def paired_comparison(
    run_records: Iterable[Mapping[str, Any]],
    reference_records: Iterable[Mapping[str, Any]],
    candidates: Mapping[str, Sequence[str]] | None = None,
    *,
    removed: str | None = None,
    alpha: float = PAIRED_ALPHA,
    clustering: Clustering | None = None,
) -> dict[str, Any]:
    """Paired comparison of two runs scored on the same samples (e.g. an ablated run vs the normal run).

    Records pair on (video_id, id); each is re-scored with strict accuracy (stored hits are ignored) against
    ``candidates`` (default: the closed sets gathered from the gold answers of both files). Returns, overall and
    per question type: ``n``, ``run_accuracy``, ``reference_accuracy``, the 2x2 table (``both_right``,
    ``both_wrong``, ``b`` = reference right and run wrong, ``c`` = run right and reference wrong),
    ``difference`` = run − reference with ``difference_ci95`` (Newcombe's paired interval), ``drop`` =
    reference − run, the exact McNemar ``p_value`` and a ``verdict`` sentence. ``removed`` names what the run
    lacks ("video"), so the verdict reads "video carries X pts, p = …" or "no measurable drop without video".

    Key sets are never silently intersected: keys found in one file only, and keys whose gold answer or question
    type differ between the files, are listed (``only_in_run``, ``only_in_reference``, ``gold_differs``) and
    left out of the paired numbers, ``keys_match`` is False and the verdict starts with a warning. A duplicate
    key in either file raises ValueError. Inputs are not modified.
    """
    runs = _keyed(run_records, "run")
    refs = _keyed(reference_records, "reference")
    if candidates is None:
        candidates = build_candidates(
            (r.get("question_type"), str(r["short_answer"])) for r in (*runs.values(), *refs.values())
        )
    only_run = set(runs) - set(refs)
    only_ref = set(refs) - set(runs)
    gold_differs = set()
    overall: list[tuple[bool, bool]] = []
    by_type: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    paired_refs: list[Mapping[str, Any]] = []
    for key in sorted(set(runs) & set(refs), key=lambda k: (k[0] or "", k[1])):
        run, ref = runs[key], refs[key]
        if (_norm_key(str(run["short_answer"])) != _norm_key(str(ref["short_answer"]))
                or question_type(run) != question_type(ref)):
            gold_differs.add(key)
            continue
        pair = (bool(score_record(run, candidates)["accuracy"]), bool(score_record(ref, candidates)["accuracy"]))
        overall.append(pair)
        by_type[question_type(ref)].append(pair)
        paired_refs.append(ref)
    clustering = clustering or Clustering()
    found = assign(paired_refs, clustering)  # the clusters of the reference's records (same clips as the run's)
    types = [question_type(r) for r in paired_refs]
    result: dict[str, Any] = {
        "method": {"interval": PAIRED_INTERVAL, "test": PAIRED_TEST, "alpha": alpha},
        "removed": removed,
        "n_run": len(runs), "n_reference": len(refs), "n_paired": len(overall),
        "keys_match": not (only_run or only_ref or gold_differs),
        "only_in_run": _key_list(only_run), "only_in_reference": _key_list(only_ref),
        "gold_differs": _key_list(gold_differs),
        "clustering": {**clustering.as_meta(), "unit": found.unit, "fallback": found.fallback},
        "overall": paired_stats(overall, removed, alpha, clustered_pairs(overall, found, clustering)),
        "per_type": {t: paired_stats(by_type[t], removed, alpha,
                                     clustered_pairs(by_type[t], found, clustering, [q == t for q in types]))
                     for t in sorted(by_type)},
    }
    verdict = result["overall"]["verdict"]
    if not result["keys_match"]:
        verdict = (f"WARNING: the files do not hold the same samples ({len(only_run)} only in the run, "
                   f"{len(only_ref)} only in the reference, {len(gold_differs)} with a different gold answer "
                   f"or type; compared on the {len(overall)} shared samples). " + verdict)
    result["verdict"] = verdict
    return result
