"""Showing FFN memories: trigger examples and value tokens as tables, and an explorer (the
method: `memories`; Geva et al., 2021)."""
from __future__ import annotations

import html
from typing import Sequence

from torch import nn

from .memories import top_memories, value_logits
from .memories_engine import Triggers
from .models import check_layer


def show_triggers(triggers: Triggers, tokenizer, layer: int, neuron: int, n: int = 10,
                  as_html: bool = True) -> str:
    """The top-n trigger examples of a key, trigger token highlighted (HTML or plain text).

    Plain text marks the trigger token as [[token]] and shows the next token after '->'.
    """
    rows = []
    for ex in triggers.examples(layer, neuron, n):
        before = tokenizer.decode(ex.prefix_ids[:-1])
        trig = tokenizer.decode(ex.prefix_ids[-1:])
        nxt = tokenizer.decode([ex.next_id]) if ex.next_id >= 0 else ""
        if as_html:
            rows.append(
                f"<tr><td style='text-align:right'>{ex.activation:.2f}</td><td style='text-align:left'>"
                f"{html.escape(before)}<mark><b>{html.escape(trig)}</b></mark></td>"
                f"<td style='text-align:left;color:gray'>{html.escape(nxt)}</td></tr>"
            )
        else:
            rows.append(f"{ex.activation:7.2f}  {before}[[{trig}]]  -> {nxt!r}")
    if not as_html:
        return f"layer {layer}, key {neuron}\n" + "\n".join(rows)
    head = f"<tr><th>m<sub>i</sub></th><th>trigger example (layer {layer}, key {neuron})</th><th>next</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def value_tokens_html(model, tokenizer, layer: int, neuron: int, k: int = 10) -> str:
    """The top-k tokens of p_i as a small HTML table, with the logit v_i . e_t of each token.

    (A raw value is short, so p_i is close to uniform: the logits show the ranking better.)"""
    logits = value_logits(model, layer, [neuron])[0]                     # [vocab]
    probs = logits.softmax(-1)
    top = logits.topk(k)
    cells = "".join(
        f"<tr><td>{html.escape(repr(tokenizer.decode([t])))}</td><td>{z:.2f}</td><td>{probs[t]:.2e}</td></tr>"
        for t, z in zip(top.indices.tolist(), top.values.tolist()))
    return (f"<table><tr><th>value's top token</th><th>v<sub>i</sub>&middot;e</th><th>p<sub>i</sub></th></tr>"
            f"{cells}</table>")


def memories_html(rows: list[dict]) -> str:
    """`top_memories` output as an HTML table."""
    body = "".join(
        f"<tr><td>{r['layer']}</td><td>{r['neuron']}</td><td>{r['coefficient']:.2f}</td>"
        f"<td>{r['strength']:.2f}</td><td>{html.escape(', '.join(repr(t) for t in r['tokens']))}</td></tr>"
        for r in rows
    )
    head = ("<tr><th>layer</th><th>neuron</th><th>m<sub>i</sub></th><th>|m<sub>i</sub>| ||v<sub>i</sub>||</th>"
            "<th>value's top tokens</th></tr>")
    return f"<table>{head}{body}</table>"


def memory_explorer(model: nn.Module, tokenizer, triggers: Triggers, prompts: Sequence[str],
                    n_examples: int = 8, k: int = 8, layer: int | None = None, neuron: int = 0):
    """Two linked ipywidgets panels (they run headless: nothing blocks):
    choose a layer and a neuron: its trigger examples and its value's top tokens;
    choose a prompt (a fact): the memories that contribute most at its last token."""
    import ipywidgets as widgets

    d = triggers.values.shape[1]
    start = triggers.layers[-1] if layer is None else check_layer(model, layer)
    layer = widgets.Dropdown(options=triggers.layers, value=start, description="layer")
    neuron = widgets.BoundedIntText(value=neuron, min=0, max=d - 1, description="neuron")
    neuron_out = widgets.HTML()

    def show_neuron(layer, neuron):
        neuron_out.value = ("<div style='display:flex;gap:2em'>"
                            f"<div>{show_triggers(triggers, tokenizer, layer, neuron, n_examples)}</div>"
                            f"<div>{value_tokens_html(model, tokenizer, layer, neuron, k)}</div></div>")

    prompt = widgets.Dropdown(options=list(prompts), description="fact")
    fact_out = widgets.HTML()

    def show_fact(prompt):
        fact_out.value = memories_html(top_memories(model, tokenizer, prompt, k))

    widgets.interactive_output(show_neuron, {"layer": layer, "neuron": neuron})
    widgets.interactive_output(show_fact, {"prompt": prompt})
    show_neuron(layer.value, neuron.value)
    show_fact(prompt.value)
    return widgets.VBox([widgets.HBox([layer, neuron]), neuron_out, prompt, fact_out])
