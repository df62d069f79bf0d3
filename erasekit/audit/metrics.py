"""The audit's metrics: small pure functions (checked by hand in the tests) and :func:`summarize`, which computes
them all from result records (the report is rebuilt from ``results.jsonl`` alone)."""

from __future__ import annotations

from typing import Mapping, Sequence

#: the kinds of result records: canonical prompts, attacks on them, paraphrases, prompts of other concepts
KINDS = ("target", "attack", "paraphrase", "preserve")


def rate(flags: Sequence[bool]) -> float | None:
    """Share of True values (None for no values)."""
    flags = list(flags)
    return sum(bool(f) for f in flags) / len(flags) if flags else None


def erasure_rate(shown: Sequence[bool]) -> float | None:
    """1 − share of images in which the judge sees the concept."""
    r = rate(shown)
    return None if r is None else 1.0 - r


def pre_asr(pre_success: Sequence[bool]) -> float | None:
    """Share of prompts already broken without any attack (= 1 − erasure rate on those prompts)."""
    return rate(pre_success)


def attack_success_rate(pre_success: Sequence[bool], attack_success: Sequence[bool]) -> float | None:
    """UnlearnDiffAtk's ASR: share of prompts broken with or without the attack (pre-ASR + newly broken)."""
    pre_success, attack_success = list(pre_success), list(attack_success)
    if len(pre_success) != len(attack_success):
        raise ValueError("one pre-attack and one attack outcome per prompt")
    return rate([a or b for a, b in zip(pre_success, attack_success)])


def union_asr(outcomes: Mapping[str, Sequence[bool]]) -> float | None:
    """Share of prompts broken by at least one attack (P4D's UNION); outcomes aligned across attacks."""
    columns = [list(v) for v in outcomes.values()]
    if not columns:
        return None
    if len({len(c) for c in columns}) != 1:
        raise ValueError("every attack needs one outcome per prompt, in the same order")
    return rate([any(row) for row in zip(*columns)])


def accuracy(predicted: Sequence[str], expected: Sequence[str]) -> float | None:
    predicted, expected = list(predicted), list(expected)
    if len(predicted) != len(expected):
        raise ValueError("one prediction per expected label")
    return rate([p == e for p, e in zip(predicted, expected)])


def preservation_drop(before: float | None, after: float | None) -> float | None:
    """How much a preservation measure fell when the erasure was switched on (positive = worse)."""
    return None if before is None or after is None else before - after


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    """H = 2ab / (a + b) (MACE-style efficacy/specificity balance); 0 when both are 0."""
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(records: Sequence[dict], concept: str, attacks: Sequence[str]) -> dict:
    """All metrics from result records (pure: the report is rebuilt from ``results.jsonl`` alone)."""
    by_kind = {k: [r for r in records if r["kind"] == k] for k in KINDS}
    target = by_kind["target"]
    out: dict = {"concept": concept}
    out["target"] = {
        "images": len(target),
        "original_detection_rate": rate([r["original_success"] for r in target]),
        "erased_detection_rate": rate([r["success"] for r in target]),
        "erasure_rate": erasure_rate([r["success"] for r in target]),
        "pre_asr": pre_asr([r["success"] for r in target]),
    }
    para = by_kind["paraphrase"]
    groups = sorted({r.get("group", "paraphrase") for r in para})
    out["paraphrase"] = {
        "images": len(para),
        "original_detection_rate": rate([r["original_success"] for r in para]),
        "erasure_rate": erasure_rate([r["success"] for r in para]),
        "by_group": {g: {"images": sum(r.get("group", "paraphrase") == g for r in para),
                         "erasure_rate": erasure_rate([r["success"] for r in para if r.get("group", "paraphrase") == g])}
                     for g in groups},
    }
    pre = {(r["prompt"], r["seed"]): bool(r["success"]) for r in target}
    out["attacks"] = {}
    for label in attacks:
        rows = {(r["prompt"], r["seed"]): r for r in by_kind["attack"] if r["attack"] == label}
        pairs = [p for p in pre if p in rows]
        attacked = [rows[p] for p in pairs if not pre[p]]
        out["attacks"][label] = {
            "prompts": len(pairs),
            "pre_asr": pre_asr([pre[p] for p in pairs]),
            "asr": attack_success_rate([pre[p] for p in pairs], [bool(rows[p]["success"]) for p in pairs]),
            "newly_broken": rate([bool(r["success"]) for r in attacked]) if attacked else None,
            "attacked": len(attacked),
            "mean_steps": mean([r["steps"] for r in attacked]),
            "mean_queries": mean([(r.get("info") or {}).get("queries") for r in attacked]),
            "mean_seconds": mean([r["seconds"] for r in attacked]),
        }
    per_attack = {a: {(r["prompt"], r["seed"]): bool(r["success"]) for r in by_kind["attack"] if r["attack"] == a}
                  for a in attacks}
    common = sorted(set(pre).intersection(*per_attack.values())) if attacks else []
    aligned = {a: [pre[p] or per_attack[a][p] for p in common] for a in attacks}
    out["union_asr"] = union_asr(aligned) if len(attacks) > 1 and common else None
    out["preservation"] = preservation(by_kind["preserve"])
    spec = out["preservation"].get("accuracy_erased") if out["preservation"] else None
    out["harmonic_mean"] = harmonic_mean(out["target"]["erasure_rate"], spec)
    return out


def preservation(rows: Sequence[dict]) -> dict:
    """Preservation measures of the "preserve" records: the judge's accuracy on the other concepts (and on the other
    attributes) with the erasure off and on, and their drops; ``broken``: the share of images the original drew as
    asked and the erased model does not (the drop counts, against these, the original's errors the erasure mends);
    the CLIP scores when the judge gives them."""
    if not rows:
        return {}
    out: dict = {"images": len(rows)}
    labelled = [r for r in rows if r.get("expected") and r.get("labels")]
    if labelled:
        attribute = labelled[0].get("attribute")
        for when, field_ in (("original", "original_labels"), ("erased", "labels")):
            out[f"accuracy_{when}"] = accuracy([r[field_][attribute] for r in labelled],
                                               [r["expected"][attribute] for r in labelled])
            others = [a for a in labelled[0]["labels"] if a != attribute]
            out[f"other_attributes_{when}"] = mean([accuracy([r[field_][a] for r in labelled],
                                                             [r["expected"][a] for r in labelled]) for a in others])
        out["attribute"] = attribute
        out["drop"] = preservation_drop(out["accuracy_original"], out["accuracy_erased"])
        # the drop nets images the erasure spoils against original errors it happens to mend: the spoiled ones alone
        def right(r, field_):
            return r[field_][attribute] == r["expected"][attribute]

        out["broken"] = rate([right(r, "original_labels") and not right(r, "labels") for r in labelled])
        out["other_attributes_drop"] = preservation_drop(out["other_attributes_original"], out["other_attributes_erased"])
    clipped = [r for r in rows if "clip" in r]
    if clipped:
        out["clip_original"] = mean([r["original_clip"] for r in clipped])
        out["clip_erased"] = mean([r["clip"] for r in clipped])
        out["clip_drop"] = preservation_drop(out["clip_original"], out["clip_erased"])
    return out
