"""``index.html``: one self-contained page per results folder (inline CSS/JS, PNGs embedded; no network).

Sortable leaderboard (click a column header), findings, the paired-interval plot, every table, every plot,
and each run's resolved config one click away (a dialog showing the record's config and meta).
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import pandas as pd

from benchmarks.runner.store import atomic_write_text, to_jsonable

LB_COLUMNS = ["run_id", "status", "model", "task", "method", "seed", "lr", "selected", "val_score", "test_score",
              "trainable_pct", "step_time_s", "wall_s"]

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:12px;margin:.6em 0}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:left;white-space:nowrap}
th{background:#f2f2f2}#leaderboard th{cursor:pointer;user-select:none}
#leaderboard th.asc::after{content:" \\25B2"}#leaderboard th.desc::after{content:" \\25BC"}
tr.sel td{background:#eef7ee}tr.bad td{color:#a33}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
.wrap{overflow-x:auto}nav a{margin-right:1em}
dialog{max-width:90vw;max-height:85vh;overflow:auto}pre{font-size:12px}
"""

JS = """
(function(){
  const configs = JSON.parse(document.getElementById('configs').textContent);
  const table = document.getElementById('leaderboard');
  const dlg = document.getElementById('config-dialog');
  table.querySelectorAll('th').forEach((th, col) => th.addEventListener('click', () => {
    const asc = !th.classList.contains('asc');
    table.querySelectorAll('th').forEach(h => h.classList.remove('asc', 'desc'));
    th.classList.add(asc ? 'asc' : 'desc');
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    const key = r => { const t = r.cells[col].dataset.v ?? r.cells[col].textContent;
                       const x = parseFloat(t); return (t !== '' && !isNaN(x) && isFinite(t)) ? x : t; };
    rows.sort((a, b) => { const x = key(a), y = key(b);
      const c = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
      return asc ? c : -c; });
    rows.forEach(r => body.appendChild(r));
  }));
  document.querySelectorAll('button.cfg').forEach(b => b.addEventListener('click', () => {
    document.getElementById('config-title').textContent = 'run ' + b.dataset.run;
    document.getElementById('config-json').textContent = JSON.stringify(configs[b.dataset.run], null, 1);
    dlg.showModal();
  }));
  document.getElementById('config-close').addEventListener('click', () => dlg.close());
})();
"""


def _inline(text: str) -> str:
    t = html.escape(text, quote=False)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


def md_to_html(md: str) -> str:
    """The markdown the report writes (headings, paragraphs, bullet lists, pipe tables) as HTML."""
    out, table, items = [], [], []

    def flush() -> None:
        if table:
            head, body = table[0], table[2:]
            out.append('<div class="wrap"><table><thead><tr>' + "".join(f"<th>{_inline(c)}</th>" for c in head)
                       + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r)
                                                          + "</tr>" for r in body) + "</tbody></table></div>")
            table.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush()
        m = re.match(r"^(#+) (.*)", line)
        if m:
            level = min(6, len(m.group(1)) + 1)
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    return "\n".join(out)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"></figure>'


def _cell(col: str, v: object) -> str:
    if v is None or (isinstance(v, float) and v != v) or v is pd.NA:
        return '<td data-v=""></td>'
    if isinstance(v, float):
        return f'<td data-v="{v!r}">{v:.4g}</td>'
    return f"<td>{html.escape(str(v))}</td>"


def leaderboard_html(lb: pd.DataFrame) -> str:
    cols = [c for c in LB_COLUMNS if c in lb.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "<th>config</th>"
    rows = []
    for rec in lb[cols].astype(object).where(lb[cols].notna(), None).to_dict("records"):
        cls = "sel" if rec.get("selected") else "bad" if rec.get("status") != "ok" else ""
        rid = html.escape(str(rec["run_id"]))
        rows.append(f'<tr class="{cls}">' + "".join(_cell(c, rec[c]) for c in cols)
                    + f'<td><button class="cfg" data-run="{rid}">config</button></td></tr>')
    return (f'<div class="wrap"><table id="leaderboard"><thead><tr>{head}</tr></thead><tbody>'
            + "".join(rows) + "</tbody></table></div>")


def page(results: Path, lb: pd.DataFrame, records: list[dict], tables: dict[str, str], plots: list[Path]) -> str:
    """The whole page as one string."""
    configs = {r["run_id"]: to_jsonable({"config": r.get("config"), "meta": r.get("meta"), "status": r.get("status"),
                                         "error": r.get("error"), "health": r.get("health")})
               for r in sorted(records, key=lambda r: r["run_id"])}
    # "</" inside a script element would end it early
    cfg_json = json.dumps(configs, sort_keys=True).replace("</", "<\\/")
    findings = results / "findings.md"
    by_kind = {k: [p for p in sorted(plots, key=lambda p: p.name) if p.name.startswith(k)]
               for k in ("paired_", "pareto_", "curves_", "mask_", "misalignment")}
    sections = [("findings", "Findings", md_to_html(findings.read_text()) if findings.exists() else ""),
                ("paired", "Paired differences vs LoRA", "".join(_img(p) for p in by_kind["paired_"])
                 + "".join(md_to_html(t) for n, t in sorted(tables.items()) if n.startswith(("paired_", "mechanism_", "activation")))),
                ("lb", "Leaderboard (click a column to sort; config opens the run's resolved config)",
                 leaderboard_html(lb)),
                ("main", "Main tables", "".join(md_to_html(t) for n, t in sorted(tables.items())
                                                if n.startswith(("main_", "towers_")))),
                ("ablation", "Controls and ablations",
                 "".join(md_to_html(t) for n, t in sorted(tables.items()) if n.startswith("ablation_"))),
                ("plots", "Pareto, curves, mask dynamics, misalignment",
                 "".join(_img(p) for k in ("pareto_", "curves_", "mask_", "misalignment") for p in by_kind[k])),
                ("selection", "Selection and tuning",
                 "".join(md_to_html(tables[n]) for n in ("selection.md", "lrs.md", "tuning.md") if n in tables))]
    nav = "".join(f'<a href="#{k}">{html.escape(title.split(" (")[0])}</a>' for k, title, _ in sections)
    body = "".join(f'<section id="{k}"><h2>{html.escape(title)}</h2>{content}</section>' for k, title, content in sections)
    name = html.escape(results.resolve().name)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>NA-LoRA Bench: {name}</title>'
            f"<style>{CSS}</style></head><body><h1>NA-LoRA Bench results: {name}</h1><nav>{nav}</nav>{body}"
            '<dialog id="config-dialog"><h3 id="config-title"></h3><pre id="config-json"></pre>'
            '<button id="config-close">close</button></dialog>'
            f'<script type="application/json" id="configs">{cfg_json}</script><script>{JS}</script></body></html>\n')


def write_index(results: Path, lb: pd.DataFrame, records: list[dict], tables: dict[str, str], plots: list[Path]) -> Path:
    """Write ``results/index.html``."""
    p = Path(results) / "index.html"
    atomic_write_text(p, page(Path(results), lb, records, tables, plots))
    return p
