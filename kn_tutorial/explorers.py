"""Interactive explorers of the chapters (ipywidgets), built on the package's methods.

Each explorer is split into a plain function that computes what one choice shows (testable without a
display) and a builder that wraps widgets around it and returns them for the notebook to `display`.
Nothing blocks and nothing needs a display to be built, so the chapters run headless (nbval, CI).
"""
from __future__ import annotations

from typing import Callable, Sequence

from .evaluation import before_after


def edit_probe(model, tokenizer, case: dict, new_object: str, editor: Callable, greedy_tokens: int = 3):
    """What editing one CounterFact-style `case` to `new_object` changes (ROME's figure of an edit, Meng et
    al., 2022): the greedy continuation and P(new), P(true) of the rewrite prompt, one paraphrase, two
    neighbours and the subject's other facts (the case's generation prompts after the first two), before
    and after `editor(model, tokenizer, request)`. The weights are restored exactly before returning.
    Returns a pandas DataFrame; raises ValueError when `new_object` is the true object."""
    rewrite = case["requested_rewrite"]
    true = rewrite["target_true"]["str"]
    if not new_object.strip():
        raise ValueError("new_object is empty: give the object the edit should write")
    if new_object.strip() == true.strip():
        raise ValueError(f"{rewrite['subject']}'s {rewrite.get('relation_id', 'object')} already is {true}: "
                         "pick another new object")
    request = {**rewrite, "target_new": {"str": new_object}}
    probe = {"rewrite": [rewrite["prompt"].format(rewrite["subject"])], "paraphrase": case["paraphrase_prompts"][:1],
             "neighbour": case["neighborhood_prompts"][:2], "other facts": case["generation_prompts"][2:]}
    frame, _ = before_after(model, tokenizer, probe, new_object, true, editor, request, greedy_tokens=greedy_tokens)
    return frame


def edit_explorer(model, tokenizer, cases: Sequence[dict], editor: Callable, default_new: str | None = None):
    """Pick a case and a new object (the true objects of `cases` are the choices): the output shows
    `edit_probe`'s greedy continuations before and after the edit, and the weights are restored after
    each choice. Returns the widget (a VBox); `display` it."""
    import ipywidgets as widgets
    from IPython.display import display

    if not cases:
        raise ValueError("no cases to explore")
    objects = sorted({c["requested_rewrite"]["target_true"]["str"] for c in cases})
    place = widgets.Dropdown(options=[(f"{c['requested_rewrite']['subject']} ({c['requested_rewrite']['target_true']['str']})", i)
                                      for i, c in enumerate(cases)], description="case")
    new = widgets.Dropdown(options=objects, value=default_new if default_new in objects else objects[0],
                           description="new object")

    def show(case_index, new_object):
        try:
            frame = edit_probe(model, tokenizer, cases[case_index], new_object, editor)
        except ValueError as error:
            print(error)
            return
        display(frame[["group", "prompt", "greedy before", "greedy after"]])

    return widgets.VBox([widgets.HBox([place, new]),
                         widgets.interactive_output(show, {"case_index": place, "new_object": new})])
