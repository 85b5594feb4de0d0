"""SIGKILL drill: kill the runner at random moments of a small real grid, resume, compare with an uninterrupted run.

    python scripts/sigkill_drill.py --out /tmp/drill              # 10 kills, smollm2-135m on sarcasm, CPU
    python scripts/sigkill_drill.py --kills 5 --workers 1 --seed 3 --out /tmp/drill-pool

1. ``reference``: the grid run once, uninterrupted, into OUT/reference.
2. ``drill``: the same grid into OUT/drill; each invocation is SIGKILLed (with ``--workers 0`` its process
   group; with workers the runner alone, and its workers must then exit by themselves) after a random delay drawn uniformly from [0.5 s, start-up + the reference's time for
   the runs still to do], until ``--kills`` kills have landed; then one invocation runs to the end.
3. Every drill record is compared with the reference record of the same run id: status, config, metrics,
   history, parameter counts, NA-LoRA history and diagnostics must be equal (timings and provenance differ).

After each kill it also checks that every file in runs/ is a complete record. Prints a table and writes
OUT/drill.json with every figure (``--markdown PATH`` also writes them as a page, e.g.
docs/fault_model_drill.md; ``--from-json OUT/drill.json --markdown PATH`` renders an earlier drill).
Exit 0 when every run is present once and identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.runner.sidefile import SIDE_SUFFIX, read_full

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("status", "config", "metrics", "history", "trainable_params", "total_params", "nalora", "diagnostics")
SUITE = """\
extends: smoke
description: "SIGKILL drill: smollm2-135m, sarcasm, lora + nalora, 2 seeds, a few steps"
tasks: [sarcasm]
methods: {{lora: {{}}, nalora: {{}}}}
seeds: [0, 1]
training: {{steps: {steps}, eval_every: 3, eval_limit: 16, test_limit: 16, log_every: 1, diag_batches: 1}}
"""


def records(out: Path) -> dict[str, dict]:
    """run id -> record; raises if any file in runs/ is not a complete JSON record."""
    recs = {}
    for p in sorted((out / "runs").glob("*.json")):
        rec = read_full(p)  # a truncated file (or a record whose side file is missing or damaged) raises here
        if not isinstance(rec, dict) or rec.get("run_id") != p.stem:
            raise ValueError(f"{p} is not a complete run record")
        recs[p.stem] = rec
    return recs


def _group_gone_after(pgid: int, limit_s: float) -> float | None:
    """Seconds until no process of group ``pgid`` is left (None if some outlive ``limit_s``)."""
    t0 = time.time()
    while time.time() - t0 < limit_s:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return time.time() - t0
        time.sleep(0.1)
    return None


def invocation(suite: Path, out: Path, workers: int, kill_after: float | None) -> tuple[int | None, float]:
    """Run the grid once; SIGKILL its process group after ``kill_after`` s. Returns (exit code or None, seconds)."""
    cmd = [sys.executable, "-m", "benchmarks.cli", "run", "--suite", str(suite), "--out", str(out), "--no-progress",
           "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.time()
    log = open(out.parent / f"{out.name}.log", "a")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        proc.wait(timeout=kill_after)
        return proc.returncode, time.time() - t0
    except subprocess.TimeoutExpired:
        if workers:
            # Kill the runner alone (as the OOM killer would): its workers must notice and exit by themselves.
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            orphans_s = _group_gone_after(proc.pid, 20.0)
            if orphans_s is None:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError("workers outlived their SIGKILLed runner by 20 s")
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return None, time.time() - t0
    finally:
        log.close()


def render(summary: dict) -> str:
    """The drill's figures as a markdown page."""
    kills = summary["kills"]
    lines = [
        "# SIGKILL drill: measured figures",
        "",
        "Written by `scripts/sigkill_drill.py` (do not edit by hand); see fault_model.md for what it checks.",
        "",
        f"- grid: smollm2-135m (asset cache), sarcasm, lora + nalora, 2 seeds, {summary['steps']} steps per run, "
        f"`--workers {summary['workers']}`, CPU; kill moments drawn with seed {summary['seed']}",
        f"- uninterrupted reference: {summary['runs']} runs in {summary['reference_s']} s "
        f"({summary.get('startup_s', '?')} s of it start-up)",
        f"- kills: {len(kills)}, "
        + ("each SIGKILL of the runner process alone; its worker exited by itself within 20 s every time"
           if summary["workers"] else "each SIGKILL of the runner's process group")
        + "; after each one every file in `runs/` was a complete record",
        f"- after the final invocation (exit {summary['final_exit']}): {summary['final_records']} records, "
        f"{summary['identical']} of {summary['runs']} identical to the reference (status, config, metrics, history, "
        f"parameter counts, NA-LoRA history, diagnostics); files other than records left: {len(summary['leftover_files'])}",
        "",
        "| kill | after (s) | records before | records after | temp files left (removed at next start) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for i, k in enumerate(kills, 1):
        lines.append(f"| {i} | {k['after_s']} | {k['records_before']} | {k['records_after']} | {k['temp_files_left']} |")
    if summary["differ"]:
        lines += ["", f"Records that differ: {summary['differ']}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="work folder (reference/, drill/, drill.json)")
    ap.add_argument("--markdown", help="also write the figures as a markdown page here")
    ap.add_argument("--from-json", help="render this drill.json with --markdown instead of running a drill")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    args = ap.parse_args()
    if args.from_json:
        if not args.markdown:
            ap.error("--from-json needs --markdown")
        Path(args.markdown).write_text(render(json.loads(Path(args.from_json).read_text())))
        return 0
    if not args.out:
        ap.error("--out is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suite = out / "drill_suite.yaml"
    suite.write_text(SUITE.format(steps=args.steps))
    rng = random.Random(args.seed)

    rc, ref_s = invocation(suite, out / "reference", args.workers, None)
    ref = records(out / "reference")
    if rc != 0 or not ref:
        print(f"reference run failed (exit {rc}); see {out / 'reference.log'}")
        return 1
    total = len(ref)
    run_s = {rid: float((r.get("perf") or {}).get("wall_s") or ref_s / total) for rid, r in ref.items()}
    overhead = max(0.0, ref_s - sum(run_s.values()))  # interpreter, imports, suite, before the first run
    print(f"reference: {total} runs in {ref_s:.1f} s ({overhead:.1f} s start-up)")

    kills, invocations = [], 0
    while len(kills) < args.kills:
        done = records(out / "drill")
        before = len(done)
        # Uniform over this invocation's expected life: start-up plus the reference's time for the runs left.
        budget = overhead + sum(run_s[rid] for rid in ref if rid not in done)
        delay = rng.uniform(0.5, max(1.0, budget))
        rc, secs = invocation(suite, out / "drill", args.workers, delay)
        invocations += 1
        after = records(out / "drill")  # every file complete, even right after a kill
        temps = [p.name for p in (out / "drill" / "runs").glob(".*")]
        if rc is None:
            kills.append({"after_s": round(delay, 2), "records_before": before, "records_after": len(after),
                          "temp_files_left": len(temps)})
            print(f"kill {len(kills):2d}: after {delay:6.1f} s, records {before} -> {len(after)}, temp files left {len(temps)}")
        elif len(after) == total:  # finished before the kill: start again from an empty folder
            print(f"invocation finished before its kill ({secs:.1f} s < {delay:.1f} s): restarting the drill grid")
            for p in (out / "drill" / "runs").glob("*.json"):
                p.unlink()
        if invocations > 4 * args.kills:
            print("too many invocations without a kill; giving up")
            return 1
    rc, secs = invocation(suite, out / "drill", args.workers, None)
    final = records(out / "drill")
    leftover = [p.name for p in (out / "drill" / "runs").iterdir() if not p.name.endswith((".json", SIDE_SUFFIX))]
    same = [rid for rid in ref if rid in final and all(final[rid].get(k) == ref[rid].get(k) for k in COMPARED)]
    differ = {rid: [k for k in COMPARED if final.get(rid, {}).get(k) != ref[rid].get(k)] for rid in ref if rid not in same}
    summary = {"runs": total, "reference_s": round(ref_s, 1), "startup_s": round(overhead, 1), "kills": kills, "final_exit": rc,
               "final_records": len(final), "identical": len(same), "differ": differ, "leftover_files": leftover,
               "workers": args.workers, "steps": args.steps, "seed": args.seed}
    (out / "drill.json").write_text(json.dumps(summary, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(render(summary))
    print(f"final invocation: exit {rc}, {len(final)} records, {len(same)}/{total} identical to the reference, "
          f"leftover files {leftover}")
    if differ:
        print(f"differ: {differ}")
    return 0 if rc == 0 and len(same) == total == len(final) and not leftover else 1


if __name__ == "__main__":
    sys.exit(main())
