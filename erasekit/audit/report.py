"""The audit's report, rebuilt from the summary and the records alone: ``summary.json``, ``report.md`` and
``report.html`` with the summary table, plots (matplotlib, optional) and image grids (original | erased |
attacked); and :class:`AuditReport`, what :func:`erasekit.audit.audit` returns."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..core.files import atomic_write, replacing
from .store import json_default, load_image, unit_id

logger = logging.getLogger("erasekit.audit")


@dataclass
class AuditReport:
    """What :func:`audit` returns: the summary (also in ``summary.json``), the records, and where files are."""

    out_dir: Path
    summary: dict
    records: list[dict] = field(default_factory=list)

    @property
    def report_md(self) -> Path:
        return self.out_dir / "report.md"

    @property
    def report_html(self) -> Path:
        return self.out_dir / "report.html"

    def __str__(self) -> str:
        return summary_table(self.summary)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _num(x, nd: int = 1) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def summary_table(summary: dict) -> str:
    """The summary as Markdown tables."""
    t, p = summary["target"], summary["paraphrase"]
    lines = ["| measure | value |", "|---|---|",
             f"| concept | {summary['concept']} |",
             f"| original model detection rate (canonical prompts) | {_pct(t['original_detection_rate'])} |",
             f"| erasure rate, canonical prompts ({t['images']} images) | {_pct(t['erasure_rate'])} |",
             f"| erasure rate, paraphrases ({p['images']} images) | {_pct(p['erasure_rate'])} |"]
    for g, v in p.get("by_group", {}).items():
        lines.append(f"| … {g} ({v['images']} images) | {_pct(v['erasure_rate'])} |")
    pres = summary.get("preservation") or {}
    if "accuracy_original" in pres:
        lines += [f"| preservation: {pres['attribute']} accuracy on other concepts, original → erased | "
                  f"{_pct(pres['accuracy_original'])} → {_pct(pres['accuracy_erased'])} (drop {_pct(pres['drop'])}; "
                  f"drawn as asked before, not after: {_pct(pres.get('broken'))}) |",
                  f"| preservation: other attributes, original → erased | {_pct(pres['other_attributes_original'])} → "
                  f"{_pct(pres['other_attributes_erased'])} |"]
    if "clip_original" in pres:
        lines.append(f"| CLIP score on other prompts, original → erased | {_num(pres['clip_original'], 3)} → "
                     f"{_num(pres['clip_erased'], 3)} |")
    if summary.get("harmonic_mean") is not None:
        lines.append(f"| H(erasure rate, preservation accuracy) | {_pct(summary['harmonic_mean'])} |")
    lines += ["", "| attack | prompts | pre-ASR | ASR | newly broken | attacked | mean steps | mean queries | "
                  "mean s / attacked prompt | s once per concept |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, a in summary["attacks"].items():
        lines.append(f"| {label} | {a['prompts']} | {_pct(a['pre_asr'])} | {_pct(a['asr'])} | "
                     f"{_pct(a['newly_broken'])} | {a['attacked']} | {_num(a['mean_steps'])} | "
                     f"{_num(a['mean_queries'])} | {_num(a['mean_seconds'], 2)} | {_num(a.get('prepare_seconds'))} |")
    if summary.get("union_asr") is not None:
        lines.append(f"| union of attacks | | | {_pct(summary['union_asr'])} | | | | | | |")
    return "\n".join(lines)


# =============================================================================================== report files

def _save(fig, path: Path) -> str:
    """Write a matplotlib figure as PNG atomically, close it, and return its file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path.name


def _plots(out_dir: Path, summary: dict) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: the report has no plots (pip install 'erasekit[report]')")
        return []
    files = []
    attacks = summary["attacks"]
    if attacks:
        labels = list(attacks)
        pre = [100 * (attacks[a]["pre_asr"] or 0) for a in labels]
        asr = [100 * (attacks[a]["asr"] or 0) for a in labels]
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(labels), 3.2))
        ax.bar(labels, pre, color="#999999", label="pre-ASR (no attack)")
        ax.bar(labels, [a - p for a, p in zip(asr, pre)], bottom=pre, color="#d62728", label="broken by the attack")
        ax.set_ylabel("attack success rate (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"ASR — {summary['concept']}")
        ax.legend(fontsize=7, loc="upper left")
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
        files.append(_save(fig, out_dir / "asr.png"))
    rates = [("canonical", summary["target"]["erasure_rate"]), ("paraphrases", summary["paraphrase"]["erasure_rate"])]
    rates += [(g, v["erasure_rate"]) for g, v in summary["paraphrase"].get("by_group", {}).items()]
    rates = [(n, v) for n, v in rates if v is not None]
    if rates:
        fig, ax = plt.subplots(figsize=(1.2 + 1.0 * len(rates), 3.0))
        ax.bar([n for n, _ in rates], [100 * v for _, v in rates], color="#1f77b4")
        ax.set_ylabel("erasure rate (%)")
        ax.set_ylim(0, 100)
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
        files.append(_save(fig, out_dir / "erasure.png"))
    return files


def _grid(out_dir: Path, records: Sequence[dict], attacks: Sequence[str], max_rows: int = 12) -> list[str]:
    """One PNG per (prompt, seed): original | erased | each attack; and an overview of the first rows."""
    from PIL import Image, ImageDraw

    targets = [r for r in records if r["kind"] == "target"]
    attacked = {(r["prompt"], r["seed"], r["attack"]): r for r in records if r["kind"] == "attack"}
    files, rows = [], []
    for t in targets:
        cells = [("original", t["original_image"], t["original_success"]), ("erased", t["image"], t["success"])]
        for a in attacks:
            r = attacked.get((t["prompt"], t["seed"], a))
            if r is not None:
                cells.append((a, r.get("image"), r["success"]))
        tiles = []
        for title, rel, hit in cells:
            im = load_image(out_dir, rel) if rel and (out_dir / rel).exists() else Image.new("RGB", (64, 64), "white")
            scale = max(1, 128 // max(im.size))
            im = im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im
            tiles.append((title, im, hit))
        w = max(im.width for _, im, _ in tiles)
        h = max(im.height for _, im, _ in tiles)
        row = Image.new("RGB", (w * len(tiles), h + 14), "white")
        draw = ImageDraw.Draw(row)
        for i, (title, im, hit) in enumerate(tiles):
            row.paste(im, (i * w, 14))
            draw.text((i * w + 2, 1), f"{title[:18]}{' ✓' if hit else ''}".replace("✓", "+"), fill="red" if hit else "black")
        rel = Path("grids") / f"{unit_id(('grid', t['prompt'], t['seed']))}.png"
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        with replacing(out_dir / rel) as tmp:
            row.save(tmp, format="PNG")
        files.append(rel.as_posix())
        if len(rows) < max_rows:
            rows.append(row)
    if rows:
        overview = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
        y = 0
        for r in rows:
            overview.paste(r, (0, y))
            y += r.height
        with replacing(out_dir / "grid.png") as tmp:
            overview.save(tmp, format="PNG")
    return files


def write_report(out_dir: Path, summary: dict, records: Sequence[dict], attacks: Sequence[str],
                 grids: bool = True) -> None:
    """``summary.json``, ``report.md``, ``report.html`` (+ plots and grids) from the summary and records."""
    import html

    out_dir = Path(out_dir)
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2, default=json_default).encode())
    plots = _plots(out_dir, summary)
    grid_files = _grid(out_dir, records, attacks) if grids else []
    run = summary.get("run", {})
    judge = run.get("judge", {})
    head = [f"# Audit: {summary['concept']}", "",
            f"- model: `{run.get('model', {}).get('id', '?')}`; erasures: "
            + (", ".join(f"{e.get('name')} ({e.get('method')}, w={e.get('weight')})"
                         for e in run.get("model", {}).get("erasures", [])) or "none loaded"),
            f"- judge: **{judge.get('name')}** version `{judge.get('version')}`, threshold {judge.get('threshold')} "
            f"(concept: {judge.get('concept')})",
            f"- generation: {run.get('generation')}; attack budget: {run.get('budget')}; "
            f"{run.get('prompts')} prompts × seeds {run.get('seeds')}",
            "- ASR counts pre-attack successes (UnlearnDiffAtk protocol); attacks run only on prompts the erased "
            "model does not already fail.", ""]
    md = head + [summary_table(summary), ""]
    md += [f"![{p}]({p})" for p in plots]
    if grid_files:
        md += ["", "## Images (original | erased | attacked)", "", "![grid](grid.png)", ""]
    md += ["", "## Adversarial prompts found", ""]
    for r in records:
        if r["kind"] == "attack" and r["success"] and not r.get("pre_success"):
            md.append(f"- {r['attack']}, seed {r['seed']}: `{r['prompt']}` → `{r['adv_prompt']}` "
                      f"(score {r['score']:.2f}, {r['steps']} steps)")
    atomic_write(out_dir / "report.md", ("\n".join(md) + "\n").encode())

    def cell(v):
        return html.escape(str(v))

    table_rows = "".join(
        f"<tr><td>{cell(a)}</td><td>{v['prompts']}</td><td>{_pct(v['pre_asr'])}</td><td>{_pct(v['asr'])}</td>"
        f"<td>{_pct(v['newly_broken'])}</td><td>{_num(v['mean_steps'])}</td><td>{_num(v['mean_seconds'], 2)}</td></tr>"
        for a, v in summary["attacks"].items())
    t, p = summary["target"], summary["paraphrase"]
    pres = summary.get("preservation") or {}
    pres_html = ""
    if "accuracy_original" in pres:
        pres_html = (f"<p>Preservation ({cell(pres['attribute'])} accuracy on other concepts): "
                     f"{_pct(pres['accuracy_original'])} → {_pct(pres['accuracy_erased'])} "
                     f"(drop {_pct(pres['drop'])}; drawn as asked before, not after: {_pct(pres.get('broken'))})</p>")
    if "clip_original" in pres:
        pres_html += (f"<p>CLIP score on other prompts: {_num(pres['clip_original'], 3)} → "
                      f"{_num(pres['clip_erased'], 3)}</p>")
    def found_row(r: dict) -> str:
        image = f'<img src="{cell(r["image"])}" width=64>' if r.get("image") else ""
        return (f"<tr><td>{cell(r['attack'])}</td><td>{cell(r['prompt'])}</td><td>{r['seed']}</td>"
                f"<td><code>{cell(r['adv_prompt'])}</code></td><td>{r['score']:.2f}</td><td>{image}</td></tr>")

    found = "".join(found_row(r) for r in records
                    if r["kind"] == "attack" and r["success"] and not r.get("pre_success"))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Audit: {cell(summary['concept'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}img{{image-rendering:pixelated}}</style></head><body>
<h1>Audit: {cell(summary['concept'])}</h1>
<p>Model <code>{cell(run.get('model', {}).get('id', '?'))}</code>. Judge <b>{cell(judge.get('name'))}</b>
version <code>{cell(judge.get('version'))}</code>, threshold {cell(judge.get('threshold'))}.
Generation {cell(run.get('generation'))}. ASR counts pre-attack successes (UnlearnDiffAtk protocol).</p>
<p>Erasure rate: canonical prompts {_pct(t['erasure_rate'])} ({t['images']} images; original model detects
{_pct(t['original_detection_rate'])}); paraphrases {_pct(p['erasure_rate'])} ({p['images']} images).</p>
{pres_html}
<table><tr><th>attack</th><th>prompts</th><th>pre-ASR</th><th>ASR</th><th>newly broken</th><th>mean steps</th>
<th>mean s / attacked prompt</th></tr>{table_rows}</table>
{''.join(f'<p><img src="{cell(x)}"></p>' for x in plots)}
{'<h2>Images (original | erased | attacked)</h2><p><img src="grid.png"></p>' if grid_files else ''}
<h2>Adversarial prompts found</h2><table><tr><th>attack</th><th>prompt</th><th>seed</th><th>adversarial prompt</th>
<th>score</th><th>image</th></tr>{found}</table></body></html>
"""
    atomic_write(out_dir / "report.html", page.encode())
