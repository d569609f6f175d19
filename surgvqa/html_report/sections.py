"""The page's result sections: the summary, per question type (accuracy bars, table, confusion matrices) and
the paired comparisons. Each is a function of scored runs (``runs.py``) that returns HTML."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from surgvqa.html_report.charts import svg_scale, svg_type_bars
from surgvqa.html_report.markup import esc, kv_table, pct
from surgvqa.html_report.runs import Pairing, Run, file_sha256, show_key
from surgvqa.metrics import AMBIGUOUS_LABEL, NONE_LABEL, UNTYPED
from surgvqa.report import format_ci as _ci


# ---------------------------------------------------------------------------------------------------- summary
def _meta_rows(run: Run) -> str:
    rows: list[tuple[str, Any]] = [("file", str(run.path)), ("sha256", file_sha256(run.path)),
                                   ("predictions", len(run.records))]
    if run.meta is None:
        return (kv_table(rows) + '<p class="media-note">meta: unknown. This file has no surgvqa_meta line (it was '
                "written by the original toolkit or an older surgvqa), so its checkpoint, data, ablation and "
                "preprocessing are not recorded.</p>")
    for k, v in run.meta.to_dict().items():
        if k == "candidates" and isinstance(v, Mapping):
            rows.append((k, f"{len(v)} question types (the closed answer sets used for scoring)"))
        elif isinstance(v, Mapping):
            rows.extend((f"{k}.{kk}", vv) for kk, vv in v.items())
        else:
            rows.append((k, v))
    return kv_table(rows)


def _clustered_html(s: Mapping[str, Any]) -> tuple[str, str]:
    """(the headline's interval text, the clustering paragraph with the per-video table)."""
    clustered = s["clustered"]
    how, acc = clustered["clustering"], clustered["accuracy"]
    unit = how["unit"]
    wilson = f"Wilson {_ci(s['accuracy_ci95'])}"
    if acc["ci95"] is None:
        head = f"strict accuracy, no clustered interval ({esc(acc['reason'])}); {wilson}"
    else:
        head = (f"strict accuracy, clustered 95 % CI {_ci(acc['ci95'])} over {acc['n_clusters']} {unit}s "
                f"(<span class='muted'>{wilson}</span>)")
    facts = [("clusters", f"{how['n_clusters']} {unit}s of {how['n_videos']} video(s) (--cluster_by "
                          f"{how['cluster_by']}, --cluster_gap {how['cluster_gap']} frames)"),
             ("bootstrap", f"{how['bootstrap']} resamples, seed {how['bootstrap_seed']}: {how['method']}")]
    if acc["design_effect"]:
        facts.append(("design effect", f"{acc['design_effect']:.2f} (effective n {acc['effective_n']:.0f} of "
                                       f"{s['n']})"))
    for name, label in (("k_acc", "K-ACC clustered 95 % CI"), ("substring", "substring clustered 95 % CI")):
        facts.append((label, _ci(clustered[name]["ci95"])))
    if clustered.get("across_videos"):
        facts.append(("videos resampled too (wider)", _ci(clustered["across_videos"]["ci95"])))
    rows = "".join(
        f'<tr><td class="l">{esc(video or "-")}</td><td>{v["n"]}</td><td>{pct(v["accuracy"])}</td>'
        f'<td>{_ci(v["clustered"]["ci95"])}</td><td>{v["clustered"]["n_clusters"]}</td><td>{_ci(v["ci95"])}</td></tr>'
        for video, v in clustered["per_video"].items())
    note = f'<p class="media-note" id="clustered-note">{esc(clustered["note"])}</p>' if clustered.get("note") else ""
    body = (f'<h3>Clustered intervals</h3>{note}{kv_table(facts)}<div class="tablewrap"><table class="data" '
            'id="per-video"><thead><tr><th class="l">video</th><th>n</th><th>strict acc.</th>'
            f'<th>clustered 95 % CI</th><th>{unit}s</th><th>Wilson 95 % CI</th></tr></thead><tbody>{rows}</tbody>'
            '</table></div>')
    return head, body


def section_summary(run: Run) -> str:
    """Strict accuracy with its clustered interval (Wilson beside it) next to majority and chance, the other
    metrics, the clustering with the per-video table, and the run's meta."""
    s = run.summary
    lo, hi = s["accuracy_ci95"]
    head, clustered = _clustered_html(s)
    delta = s["accuracy"] - s["majority_baseline"]
    cls = "pos" if lo > s["majority_baseline"] else "neg" if hi < s["majority_baseline"] else ""
    meteor = pct(s["meteor"]) if s.get("meteor") is not None else f"unavailable ({s.get('meteor_unavailable')})"
    no_eos = f"{s['no_eos']} / {s['n']}"
    if s.get("eos_unknown"):
        no_eos += f" ({s['eos_unknown']} lines do not record stopped_by_eos)"
    metrics = [
        ("K-ACC (SurgViVQA keyword)", f"{pct(s['k_acc'])} of {s['k_acc_n']} counted"),
        ("substring (original toolkit rule)", pct(s["substring_acc"])),
        ("exact match (long answer)", pct(s["exact_match"])),
        ("BLEU-4", f"{s['bleu4']:.3f}"),
        ("ROUGE-L", f"{s['rouge_l']:.3f}"),
        ("METEOR", meteor),
        ("no EOS (loops or cut at max tokens)", no_eos),
        ("mean new tokens", "n/a" if s.get("mean_new_tokens") is None else f"{s['mean_new_tokens']:.1f}"),
        ("collapsed types", ", ".join(s["collapsed_types"]) or "none"),
        ("scoring", s.get("scoring")),
    ]
    return (
        '<section id="summary"><h2>Summary</h2><div class="grid2"><div class="panel">'
        f'<div class="headline"><span class="big" id="overall-accuracy">{pct(s["accuracy"])}</span>'
        f'<span class="ci" id="overall-ci">{head} · {s["accuracy_hits"]} of {s["n"]}</span></div>'
        f'<p>majority baseline <b>{pct(s["majority_baseline"])}</b> '
        f'(<span class="delta {cls}">{100 * delta:+.1f} pts</span>) · chance {pct(s["chance_baseline"])}</p>'
        f'{svg_scale(s["accuracy"], lo, hi, s["majority_baseline"], s["chance_baseline"])}'
        f'{clustered}<h3>Other metrics</h3>{kv_table(metrics)}</div>'
        f'<div class="panel"><h3 style="margin-top:0">Run</h3>{_meta_rows(run)}</div></div></section>'
    )


# ------------------------------------------------------------------------------------------------ per type
MAX_MATRIX_ANSWERS = 14


def _norm(text: Any) -> str:
    return str(text).strip().lower()


def _gold_label(short: str, candidates: Sequence[str]) -> str:
    return next((c for c in candidates if _norm(c) == _norm(short)), short)


def confusion(run: Run) -> dict[str, Counter[tuple[str, str]]]:
    """(gold answer, predicted answer) counts per question type; predicted = ``surgvqa.metrics.predicted_label``."""
    out: dict[str, Counter[tuple[str, str]]] = {}
    per_type = run.summary["per_type"]
    for rec, label in zip(run.records, run.labels, strict=True):
        qtype = rec.get("question_type") or UNTYPED
        gold = _gold_label(str(rec["short_answer"]), per_type[qtype]["candidates"])
        out.setdefault(qtype, Counter())[(gold, label)] += 1
    return out


def _matrix(qtype: str, t: Mapping[str, Any], counts: Counter[tuple[str, str]]) -> str:
    gold_n = Counter()
    pred_n = Counter()
    for (g, p), c in counts.items():
        gold_n[g] += c
        pred_n[p] += c
    answers = list(t["candidates"])
    if len(answers) > MAX_MATRIX_ANSWERS:
        answers = [a for a, _ in (gold_n + pred_n).most_common(MAX_MATRIX_ANSWERS - 1)]
    other = "(other)"
    shown = set(answers)

    def fold(a: str) -> str:
        return a if a in shown or a in (NONE_LABEL, AMBIGUOUS_LABEL) else other

    folded: Counter[tuple[str, str]] = Counter()
    for (g, p), c in counts.items():
        folded[(fold(g), fold(p))] += c
    rows = answers + ([other] if any(g == other for g, _ in folded) else [])
    cols = answers + [c for c in (other, NONE_LABEL, AMBIGUOUS_LABEL) if any(p == c for _, p in folded)]
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for g in rows:
        total = sum(folded[(g, c)] for c in cols)
        cells = []
        for c in cols:
            n = folded[(g, c)]
            alpha = n / total if total else 0.0
            style = f"background:rgba(47,111,223,{0.85 * alpha:.2f});" + ("color:#fff;" if alpha > 0.5 else "")
            diag = ' class="diag"' if g == c else ""
            cells.append(f'<td{diag} style="{style}" title="gold {esc(g)}, predicted {esc(c)}: {n}">'
                         f'{n if n else ""}</td>')
        body.append(f"<tr><th>{esc(g)}</th>{''.join(cells)}</tr>")
    flag = ""
    if t["collapse"]:
        flag = (f'<span class="flag collapse" title="one answer for more than 90 % of the samples although the gold '
                f'answers differ">COLLAPSE</span><span class="muted">{esc(t["top_predicted"])} '
                f'{pct(t["top_predicted_share"], 0)}</span>')
    return (f'<div class="cm"><h4>{esc(qtype)} <span class="muted">n={t["n"]}</span>{flag}</h4>'
            f'<table><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            '<div class="muted" style="font-size:11px">rows: gold · columns: predicted</div></div>')


def section_types(run: Run, compared: Sequence[Run]) -> str:
    """Per question type: accuracy bars (every run side by side), the table, and gold-vs-predicted matrices."""
    per_type = run.summary["per_type"]
    types = list(per_type)
    series = [(run.label, per_type)] + [(c.label, c.summary["per_type"]) for c in compared]
    chart = svg_type_bars(
        types, series, {t: v["majority_baseline"] for t, v in per_type.items()},
        {t: v["chance_baseline"] for t, v in per_type.items()}, run.summary["collapsed_types"],
    )
    rows = []
    clustered_types = run.summary["clustered"]["per_type"]
    for qtype, t in per_type.items():
        lo, hi = t["ci95"]
        flag = '<span class="flag collapse">COLLAPSE</span>' if t["collapse"] else ""
        rows.append(
            f'<tr><td class="l">{esc(qtype)}</td><td>{t["n"]}</td><td>{pct(t["accuracy"])}</td>'
            f'<td>{_ci(clustered_types.get(qtype, {}).get("ci95"))}</td><td>[{100 * lo:.1f}, {100 * hi:.1f}]</td>'
            f'<td>{pct(t["majority_baseline"])}</td>'
            f'<td class="l">{esc(t["majority_answer"])}</td><td>{pct(t["chance_baseline"])}</td>'
            f'<td class="l">{esc(t["top_predicted"])} ({pct(t["top_predicted_share"], 0)})</td>'
            f'<td>{pct(t["k_acc"])}</td><td class="l">{flag}</td></tr>'
        )
    s = run.summary
    lo, hi = s["accuracy_ci95"]
    rows.append(
        f'<tr class="overall"><td class="l">overall</td><td>{s["n"]}</td><td>{pct(s["accuracy"])}</td>'
        f'<td>{_ci(s["clustered"]["accuracy"]["ci95"])}</td><td>[{100 * lo:.1f}, {100 * hi:.1f}]</td>'
        f'<td>{pct(s["majority_baseline"])}</td><td></td>'
        f'<td>{pct(s["chance_baseline"])}</td><td></td><td>{pct(s["k_acc"])}</td><td></td></tr>'
    )
    table = (
        '<div class="tablewrap"><table class="data"><thead><tr><th class="l">question type</th><th>n</th>'
        '<th>strict acc.</th><th>clustered 95 % CI</th><th>Wilson 95 % CI</th><th>majority</th>'
        '<th class="l">majority answer</th><th>chance</th>'
        '<th class="l">top predicted (share)</th><th>K-ACC</th><th class="l"></th></tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table></div>'
    )
    matrices = confusion(run)
    cms = "".join(_matrix(q, per_type[q], matrices[q]) for q in types)
    legend = "this run" if not compared else "runs side by side"
    return (
        '<section id="types"><h2>Per question type</h2>'
        f'<div class="panel"><h3 style="margin-top:0">Strict accuracy with 95 % intervals ({legend}); solid line: '
        'majority baseline, dashed: chance</h3>'
        f'{chart}</div><div class="panel" style="margin-top:12px">{table}</div>'
        '<h3>Gold vs predicted answer (closed answer sets)</h3>'
        f'<p class="muted">Predicted = the one candidate the prediction states; {esc(NONE_LABEL)}: none stated, '
        f'{esc(AMBIGUOUS_LABEL)}: more than one. COLLAPSE: one answer for more than 90 % of a type whose gold answers '
        f'differ.</p><div class="cm-grid">{cms}</div></section>'
    )


# --------------------------------------------------------------------------------------------------- compare
def _keys_text(listed: Mapping[str, Any] | None) -> tuple[int, str]:
    """``paired_comparison``'s {"n", "examples"} as (n, "key, key, …")."""
    if not listed:
        return 0, ""
    examples = listed.get("examples", [])
    more = " …" if listed.get("n", 0) > len(examples) else ""
    return listed.get("n", 0), ", ".join(show_key(tuple(k)) for k in examples) + more


def section_compare(pairings: Sequence[Pairing]) -> str:
    """Each paired comparison: its verdict, the unpaired keys, and per type the paired numbers and McNemar p."""
    parts = ['<section id="compare"><h2>Paired comparison</h2>'
             '<p class="muted">The two runs are paired by (video_id, id) and both are scored with this report\'s '
             "closed answer sets. The run that lacks something (an ablation) is the <i>run</i>, the other the "
             "<i>reference</i>. b: reference right, run wrong; c: the reverse; p: exact McNemar test on b and c; "
             "difference = run − reference in points, with its paired 95 % interval (Newcombe). Clustered: the "
             "cluster-bootstrap interval of the difference and the clustered McNemar test (an exact sign-flip test "
             "of the per-segment b − c) over the segments; they decide the verdict when the questions form "
             "clusters.</p>"]
    for pairing in pairings:
        pc = pairing.result
        parts.append(f'<div class="panel" style="margin-bottom:12px"><h3 style="margin-top:0">run '
                     f'{esc(pairing.run.label)} vs reference {esc(pairing.reference.label)}</h3>'
                     f'<p class="muted mono">{esc(pairing.run.path)} vs {esc(pairing.reference.path)}</p>'
                     f'<p class="verdict">{esc(pc.get("verdict") or pc["overall"].get("verdict", ""))}</p>')
        for field_name, where in (("only_in_run", f"only in {pairing.run.label}"),
                                  ("only_in_reference", f"only in {pairing.reference.label}"),
                                  ("gold_differs", "with a different gold answer or type")):
            n, examples = _keys_text(pc.get(field_name))
            if n:
                parts.append(f'<p class="media-note">{n} sample(s) {esc(where)}, not paired: {esc(examples)}</p>')
        rows = []
        for name, block in [("overall", pc["overall"]), *pc.get("per_type", {}).items()]:
            ci = block.get("difference_ci95") or [None, None]
            ci_txt = "" if None in ci else f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
            diff = block.get("difference")
            diff_txt = "" if diff is None else f"{100 * diff:+.1f}"
            p = block.get("p_value")
            p_txt = "n/a" if p is None else (f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}")
            cl = block.get("clustered") or {}
            cp = cl.get("p_value")
            cp_txt = "n/a" if cp is None else (f"{cp:.2g}" if cp >= 1e-4 else f"{cp:.1e}")
            ccl = cl.get("ci95")
            cci_txt = "n/a" if ccl is None else f"[{100 * ccl[0]:+.1f}, {100 * ccl[1]:+.1f}]"
            decides = cp if cl and cl.get("unit") != "question" else p
            strong = " verdict" if decides is not None and decides < 0.05 else ""
            rows.append(
                f'<tr{" class=overall" if name == "overall" else ""}><td class="l">{esc(name)}</td>'
                f'<td>{block.get("n")}</td><td>{pct(block.get("reference_accuracy"))}</td>'
                f'<td>{pct(block.get("run_accuracy"))}</td><td>{diff_txt}</td><td>{ci_txt}</td>'
                f'<td>{block.get("b")}</td><td>{block.get("c")}</td><td>{p_txt}</td><td>{cci_txt}</td>'
                f'<td>{cp_txt}</td>'
                f'<td class="l wrap{strong}">{esc(block.get("verdict") or "")}</td></tr>'
            )
        parts.append(
            '<div class="tablewrap"><table class="data"><thead><tr><th class="l">question type</th><th>paired n</th>'
            f'<th title="{esc(pairing.reference.label)}">reference</th><th title="{esc(pairing.run.label)}">run</th>'
            '<th>difference</th><th>95 % CI</th><th>b</th><th>c</th><th>McNemar p</th><th>clustered 95 % CI</th>'
            '<th>clustered p</th><th class="l">verdict</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table></div></div>'
        )
    parts.append("</section>")
    return "".join(parts)
