"""The chapters' exercises, as a teacher hands them out (ARENA style, see chapter 3).

* the student notebooks in book/exercises/ are in sync with the chapters: regenerating
  them with scripts/make_student_notebooks.py gives identical files;
* they hold no solution and no output, and every stub is still there;
* every check in kn_tutorial.exercises passes on the reference solution taken from the
  chapter's <details> dropdown, and on the stub prints the not-implemented reminder and
  returns a falsy value (the convention of kn_tutorial/exercises/__init__.py).

The checks run in a namespace holding the chapter's imports and the Atlas model (the
checks use small inputs). When a stub, check or solution needs a name the chapter
defines elsewhere, the chapter cell that defines it is run first, the way a reader runs
the chapter from the top; a name no earlier cell defines fails with a message saying so.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

from kn_tutorial.exercises import TODO
from tests.tiny import load_script

ROOT = Path(__file__).resolve().parents[1]
msn = load_script("make_student_notebooks")

REGENERATE = "python scripts/make_student_notebooks.py"


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _all_exercises() -> list:
    return [ex for path in msn.chapters() for ex in msn.exercises(_load(path), path.stem)]


EXERCISES = _all_exercises()


# ---- the student notebooks ------------------------------------------------------------------

def test_student_notebooks_are_in_sync_with_the_chapters():
    want = msn.render()
    have = {p.name: p.read_text(encoding="utf-8") for p in [*msn.OUT.glob("*.ipynb"), msn.OUT / "README.md"]
            if p.is_file()}
    assert sorted(have) == sorted(want), f"book/exercises/ has {sorted(have)}, expected {sorted(want)}: run `{REGENERATE}`"
    stale = [name for name in want if have[name] != want[name]]
    assert not stale, f"out of date: {stale}; run `{REGENERATE}`"
    assert msn.main(["--check"]) == 0


def test_regenerating_is_deterministic():
    assert msn.render() == msn.render()


@pytest.mark.parametrize("path", sorted(msn.OUT.glob("*.ipynb")), ids=lambda p: p.name)
def test_student_notebook_has_stubs_but_no_solutions_or_outputs(path):
    student = _load(path)
    chapter = _load(msn.BOOK / path.name)
    assert not msn.exercises(student), "a solution dropdown survived"
    text = "\n".join(msn.source(c) for c in student["cells"])
    assert "<details" not in text and "Solution</summary>" not in text
    for cell in student["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    n_stubs = sum("raise NotImplementedError" in msn.source(c) for c in student["cells"])
    assert n_stubs == len(msn.exercises(chapter)) > 0
    assert f"blob/main/book/exercises/{path.name}" in text  # the Colab badge opens the student version
    ids = [c["id"] for c in student["cells"]]
    assert len(ids) == len(set(ids))
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.reads(path.read_text(encoding="utf-8"), as_version=4))


def test_solution_removal_keeps_the_text_around_it():
    notebook = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": "code", "id": "a", "metadata": {}, "execution_count": 3, "outputs": [{"x": 1}],
         "source": "def my_f(x):\n    raise NotImplementedError\n\n\ncheck_f(my_f)"},
        {"cell_type": "markdown", "id": "b", "metadata": {},
         "source": "<details><summary>Solution</summary>\n\n```python\ndef my_f(x):\n    return x\n```\n\n"
                   "Why it works.\n\n</details>\n\n### Exercise 2: next\n"}]}
    (ex,) = msn.exercises(notebook, "99_toy")
    assert ex.solution == "def my_f(x):\n    return x\n" and "NotImplementedError" in ex.stub
    cells = {c["id"]: c for c in msn.student_version(notebook, "99_toy")["cells"]}
    assert cells["a"]["outputs"] == [] and cells["a"]["execution_count"] is None
    assert "Why it works" not in cells["b"]["source"] and cells["b"]["source"].endswith("### Exercise 2: next\n")
    assert not any("os.chdir" in c["source"] for c in cells.values())  # the data travels with the package


@pytest.mark.parametrize("path", msn.chapters(), ids=lambda p: p.name)
def test_every_chapter_after_the_first_has_four_to_eight_exercises(path):
    if path.name.startswith("00_"):
        pytest.skip("chapter 0 introduces the Atlas model and has no exercises")
    n = len(msn.exercises(_load(path), path.stem))
    assert 4 <= n <= 8, f"{path.name} has {n} exercises (stub + <details> solution pairs); the book asks for 4-8"


@pytest.mark.parametrize("path", msn.chapters(), ids=lambda p: p.name)
def test_every_chapter_after_the_first_ends_with_questions_and_answers(path):
    if path.name.startswith("00_"):
        pytest.skip("chapter 0 introduces the Atlas model")
    cells = [msn.source(c) for c in _load(path)["cells"] if c["cell_type"] == "markdown"]
    (block,) = [c for c in cells if c.startswith("## Check your understanding")]
    n_answers = len(msn.ANSWER.findall(block))
    n_questions = len(re.findall(r"^\d+\. ", block, re.M))
    assert 3 <= n_questions == n_answers <= 5, f"{path.name}: {n_questions} questions, {n_answers} answers"
    assert cells.index(block) > max(i for i, c in enumerate(cells) if "<summary>Solution</summary>" in c), \
        "the questions come after the chapter's last exercise"
    student = "\n".join(msn.source(c) for c in _load(msn.OUT / path.name)["cells"])
    assert "## Check your understanding" in student and msn.ANSWER_REMOVED.strip() in student


# ---- the checks: pass on the solution, remind on the stub ----------------------------------

_MAGIC = re.compile(r"^(\s*)[%!].*$", re.M)
_NAMESPACES: dict[str, dict] = {}
_ATLAS: tuple | None = None


def _python(src: str) -> str:
    """Cell source with IPython magics (%pip, !ls) replaced by `pass`."""
    return _MAGIC.sub(lambda m: m.group(1) + "pass", src)


def _bound_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.For, ast.With)):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            if isinstance(node, ast.With):
                targets = [item.optional_vars for item in node.items]
            for target in targets:
                for sub in ast.walk(target) if target is not None else ():
                    if isinstance(sub, ast.Name):
                        names.add(sub.id)
    return names


def _code_cells(chapter: str) -> list[str]:
    notebook = _load(msn.BOOK / f"{chapter}.ipynb")
    return [_python(msn.source(c)) for c in notebook["cells"] if c["cell_type"] == "code"]


def _namespace(chapter: str) -> dict:
    """The chapter's top-level imports, executed once per chapter."""
    if chapter not in _NAMESPACES:
        ns: dict = {"__name__": f"chapter_{chapter}", "MODEL_NAME": "atlas"}
        exec("from IPython.display import display", ns)
        for src in _code_cells(chapter):
            try:
                tree = ast.parse(src)
            except SyntaxError:
                continue
            imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
            exec(compile(ast.Module(body=imports, type_ignores=[]), chapter, "exec"), ns)
        _NAMESPACES[chapter] = ns
    return _NAMESPACES[chapter]


def _atlas():
    global _ATLAS
    if _ATLAS is None:
        from kn_tutorial.models import load_model

        _ATLAS = load_model("atlas", device="cpu")
    return _ATLAS


def _run(code: str, ns: dict, chapter: str, mode: str = "exec"):
    """exec/eval `code` in `ns`; a missing name is defined first by the chapter cell that binds it."""
    for _ in range(25):
        try:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                torch.manual_seed(0)
                result = (eval if mode == "eval" else exec)(compile(code, chapter, mode), ns)
            return result, out.getvalue()
        except NameError as err:
            name = err.name
            if name in ("model", "tokenizer"):
                ns["model"], ns["tokenizer"] = _atlas()
                continue
            defining = [src for src in _code_cells(chapter) if _binds(src, name)]
            if not defining:
                raise AssertionError(f"{chapter}: the exercise needs `{name}`, which no code cell of the chapter "
                                     f"defines at top level") from err
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(defining[0], f"{chapter} (cell defining {name})", "exec"), ns)
    raise AssertionError(f"{chapter}: could not resolve the names the exercise needs")


def _binds(src: str, name: str) -> bool:
    try:
        return name in _bound_names(ast.parse(src))
    except SyntaxError:
        return False


def _split_stub(stub: str) -> tuple[str, list[str]]:
    """(the stub cell without its check calls, the check calls as expressions)."""
    tree = ast.parse(_python(stub))
    checks = [n for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
              and isinstance(n.value.func, ast.Name) and n.value.func.id.startswith("check_")]
    rest = [n for n in tree.body if n not in checks]
    return ast.unparse(ast.Module(body=rest, type_ignores=[])), [ast.unparse(n.value) for n in checks]


@pytest.mark.parametrize("ex", EXERCISES, ids=lambda e: f"{e.chapter[:2]}-{e.title.split(':')[0].replace(' ', '')}")
def test_check_passes_on_the_solution_and_reminds_on_the_stub(ex):
    setup, checks = _split_stub(ex.stub)
    assert checks, f"{ex.chapter} / {ex.title}: the stub cell has no check_...(...) call"
    ns = _namespace(ex.chapter)
    _run(setup, ns, ex.chapter)
    for call in checks:
        result, printed = _run(call, ns, ex.chapter, mode="eval")
        assert not result, f"{ex.chapter} / {ex.title}: {call} accepted the stub"
        assert TODO in printed, f"{ex.chapter} / {ex.title}: {call} on the stub printed {printed!r}, not the reminder"
    _run(ex.solution, ns, ex.chapter)
    for call in checks:
        result, printed = _run(call, ns, ex.chapter, mode="eval")
        assert result is True, f"{ex.chapter} / {ex.title}: {call} on the solution returned {result!r}; it printed {printed!r}"


def test_readme_links_the_student_notebooks():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"/blob/main/book/exercises/(\d\d_\w+\.ipynb)\)", readme))
    generated = {p.name for p in msn.OUT.glob("*.ipynb")}
    assert generated <= linked, f"README.md has no Colab link for {sorted(generated - linked)}"
    for name in linked:  # a link whose chapter exists must open a student notebook
        if (msn.BOOK / name).exists():
            assert name in generated, f"README.md links book/exercises/{name}, which is not generated"


# ---- the checks reject plausible wrong answers, and cannot be fooled -----------------------------

from kn_tutorial.exercises import attribution as ex_attribution  # noqa: E402
from kn_tutorial.exercises import harness  # noqa: E402
from kn_tutorial.exercises import memit as ex_memit  # noqa: E402
from kn_tutorial.exercises import memnet as ex_memnet  # noqa: E402
from kn_tutorial.exercises import memories as ex_memories  # noqa: E402
from kn_tutorial.exercises import neurons as ex_neurons  # noqa: E402
from kn_tutorial.exercises import rome as ex_rome  # noqa: E402
from kn_tutorial.exercises import tracing as ex_tracing  # noqa: E402
from kn_tutorial.weights import preserve  # noqa: E402
from tests.exercise_wrong_answers import WRONG  # noqa: E402

_CHECKS = {  # WRONG's key -> (check, what it needs besides the student's function)
    "check_ffn_output": (ex_memories.check_ffn_output, ("model",)),
    "check_value_top_tokens": (ex_memories.check_value_top_tokens, ("model",)),
    "check_agreement_rate": (ex_memories.check_agreement_rate, ()),
    "check_top_triggers": (ex_memories.check_top_triggers, ("model", "tokenizer")),
    "check_hops": (ex_memnet.check_hops, ()),
    "check_position_encoding": (ex_memnet.check_position_encoding, ()),
    "check_memory_hop": (ex_memnet.check_memory_hop, ()),
    "check_effective_number": (ex_memnet.check_effective_number, ()),
    "check_riemann_alphas": (ex_attribution.check_riemann_alphas, ()),
    "check_layer_ig": (ex_attribution.check_layer_ig, ("model", "tokenizer")),
    "check_probability_gap": (ex_attribution.check_probability_gap, ("model", "tokenizer")),
    "check_activation_times_gradient": (ex_attribution.check_activation_times_gradient, ("model", "tokenizer")),
    "check_scaled_probability": (ex_neurons.check_scaled_probability, ("model", "tokenizer")),
    "check_refine": (ex_neurons.check_refine, ()),
    "check_adapt_p": (ex_neurons.check_adapt_p, ()),
    "check_kn_update": (ex_neurons.check_kn_update, ("model", "tokenizer")),
    "check_token_roles": (ex_tracing.check_token_roles, ()),
    "check_corrupted": (ex_tracing.check_corrupted, ("model", "tokenizer")),
    "check_restore_hidden": (ex_tracing.check_restore_hidden, ("model", "tokenizer")),
    "check_aie_by_role": (ex_tracing.check_aie_by_role, ()),
    "check_severed": (ex_tracing.check_severed, ("model", "tokenizer")),
    "check_rank_one_update_rome": (ex_rome.check_rank_one_update, ()),
    "check_k_star": (ex_rome.check_k_star, ("model", "tokenizer")),
    "check_v_star_loss": (ex_rome.check_v_star_loss, ()),
    "check_efficacy": (ex_rome.check_efficacy, ("model", "tokenizer", "case")),
    "check_joint_update": (ex_memit.check_joint_update, ()),
    "check_rank_one_update_memit": (ex_memit.check_rank_one_update, ()),
    "check_key_groups": (ex_memit.check_key_groups, ()),
    "check_layer_loop": (ex_memit.check_layer_loop, ("model", "tokenizer")),
}


def _kuwait_case() -> dict:
    from kn_tutorial.atlas.counterfact import load_counterfact

    kuwait = next(c for c in load_counterfact() if c["requested_rewrite"]["subject"] == "Kuwait"
                  and c["requested_rewrite"]["relation_id"] == "continent")
    return {**kuwait, "requested_rewrite": {**kuwait["requested_rewrite"], "prompt": "{} lies on the continent of",
                                            "target_new": {"str": "Europe"}}}


def _arguments(needs) -> list:
    model, tokenizer = _atlas()
    given = {"model": model, "tokenizer": tokenizer}
    return [given[n] if n in given else _kuwait_case() for n in needs]


def test_every_check_of_the_chapters_has_wrong_answers():
    names = {name for ex in EXERCISES for name in re.findall(r"\b(check_\w+)\(", ex.stub)}
    covered = {key.rsplit("_rome", 1)[0].rsplit("_memit", 1)[0] for key in _CHECKS}
    assert names <= covered, f"checks without wrong answers in tests/exercise_wrong_answers.py: {names - covered}"
    assert all(len(WRONG[key]) >= 2 for key in _CHECKS)


@pytest.mark.parametrize("key,label,wrong,piece", [(k, *w) for k, ws in WRONG.items() for w in ws],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_check_rejects_a_plausible_wrong_answer(key, label, wrong, piece):
    check, needs = _CHECKS[key]
    args = _arguments(needs)
    snapshot = preserve(_atlas()[0])
    with contextlib.redirect_stdout(io.StringIO()) as out:
        with pytest.raises(Exception) as err:
            check(wrong, *args)
    assert "Correct" not in out.getvalue()
    assert piece in str(err.value), f"{key} on '{label}': expected a message with {piece!r}, got: {err.value}"
    assert snapshot.changed() == [], f"{key} on '{label}' left the model changed: {snapshot.changed()}"


def test_a_check_stops_an_endless_loop(monkeypatch):
    monkeypatch.setattr(harness, "TIME_LIMIT", 0.5)

    def forever(W, C, k_star, v_star):
        while True:
            try:
                torch.zeros(1).sum()
            except Exception:  # a student's broad except must not swallow the time limit
                pass

    with pytest.raises(harness.ExerciseError, match="did not finish within"):
        ex_rome.check_rank_one_update(forever)


def test_weights_are_restored_when_the_function_fails_halfway():
    from kn_tutorial.models import mlp_out_weight

    model, tokenizer = _atlas()
    snapshot = preserve(model)

    def breaks(model, tokenizer, prompt, subject, layer, prefixes):
        with torch.no_grad():
            mlp_out_weight(model, 0).zero_()
        raise ValueError("a bug after the damage")

    with pytest.raises(ValueError, match="a bug after the damage"):  # the student's own error, unchanged
        ex_rome.check_k_star(breaks, model, tokenizer)
    assert snapshot.changed() == []


def test_a_missing_return_gets_one_sentence():
    with pytest.raises(harness.ExerciseError, match="returned None: did you forget the `return`"):
        ex_memit.check_joint_update(lambda mom2, keys, residuals, lam: None)


def test_forbidden_functions_work_again_after_the_check():
    from kn_tutorial import rome

    with pytest.raises(harness.ExerciseError):
        ex_rome.check_rank_one_update(lambda W, C, k, v: W + rome.rank_one_update(W.clone(), C, k, v - W @ k))
    W, C, k, v = ex_rome._problem(0)
    delta = rome.rank_one_update(W.clone(), C, k, v - W @ k)  # the package function is restored
    assert torch.allclose((W + delta) @ k, v)


def test_a_correct_float32_answer_passes_at_the_dtypes_tolerance():
    def float32_update(W, C, k_star, v_star):
        W, C, k_star, v_star = (t.float() for t in (W, C, k_star, v_star))
        u = torch.linalg.solve(C, k_star)
        return W + torch.outer((v_star - W @ k_star) / (u @ k_star), u)

    with contextlib.redirect_stdout(io.StringIO()):
        assert ex_rome.check_rank_one_update(float32_update) is True


@pytest.mark.parametrize("path", msn.chapters(), ids=lambda p: p.name)
def test_no_check_leaves_a_bare_boolean_under_an_exercise(path):
    """A stub's check prints its reminder and returns None, so the executed chapter shows the
    reminder and nothing else; a stray `False` under an exercise means the chapter was executed
    with an older check (re-execute it)."""
    for cell in _load(path)["cells"]:
        for output in cell.get("outputs", []):
            shown = "".join(output.get("data", {}).get("text/plain", "")).strip()
            assert shown not in ("True", "False"), (
                f"{path.name}, cell {cell.get('id')}: a bare {shown} under the cell; re-execute the chapter")
