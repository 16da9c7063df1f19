"""Recall of the Atlas model: does it know its world, and does it generalise to paraphrases?

For every fact and every prompt template of its relation, the model is asked the prompt
and we check the object (with its leading space):
- first-token recall: the object's first token is the model's top prediction;
- full recall: greedy decoding produces every token of the object.
Templates are grouped into `train` (seen in training), `isa` (the "{} is a ..." sentence,
also seen), `heldout` (paraphrases never used with this relation in training, built from known
words) and `novel` (paraphrases with words the model never saw; reported apart).
"""
from __future__ import annotations

from collections import defaultdict

from ..atlas.templates import TEMPLATES, fill
from ..atlas.world import World, load_world
from ..scoring import score

GROUPS = ("train", "isa", "heldout", "novel")


def recall_prompts(world: World) -> list[dict]:
    """One row per (fact, template): prompt, target, relation, group, template."""
    rows = []
    for fact in world.facts:
        t = TEMPLATES[fact.relation]
        groups = [("train", x) for x in t.train] + [("isa", t.isa)] + [("heldout", x) for x in t.heldout]
        groups += [("novel", x) for x in t.novel]
        for group, template in groups:
            rows.append({
                "prompt": fill(template, fact.subject, fact.subject_kind), "target": fact.object,
                "relation": fact.relation, "group": group, "template": template, "subject": fact.subject,
            })
    return rows


def recall_report(model, tokenizer, world: World | None = None, batch_size: int = 512) -> dict:
    """Recall by relation and template group, and by template; fractions in [0, 1]."""
    world = world or load_world()
    rows = recall_prompts(world)
    scores = score(model, tokenizer, [r["prompt"] for r in rows], [r["target"] for r in rows],
                   batch_size=batch_size, show_progress=True)
    by_group = defaultdict(lambda: defaultdict(list))
    by_template = defaultdict(lambda: defaultdict(list))
    for r, first, full in zip(rows, scores["first_correct"].tolist(), scores["all_correct"].tolist()):
        for key in (r["relation"], "all"):
            by_group[(key, r["group"])]["first"].append(first)
            by_group[(key, r["group"])]["full"].append(full)
        by_template[(r["relation"], r["group"], r["template"])]["first"].append(first)
        by_template[(r["relation"], r["group"], r["template"])]["full"].append(full)

    def mean(xs):
        return sum(xs) / len(xs)

    return {
        "by_relation": [
            {"relation": rel, "group": grp, "n": len(v["first"]),
             "first_token": mean(v["first"]), "full": mean(v["full"])}
            for (rel, grp), v in sorted(by_group.items())
        ],
        "by_template": [
            {"relation": rel, "group": grp, "template": tpl, "n": len(v["first"]),
             "first_token": mean(v["first"]), "full": mean(v["full"])}
            for (rel, grp, tpl), v in sorted(by_template.items())
        ],
    }


def format_recall(report: dict) -> str:
    lines = [f"{'relation':<10} {'templates':<8} {'prompts':>7} {'first-token':>11} {'full':>7}"]
    for row in report["by_relation"]:
        lines.append(f"{row['relation']:<10} {row['group']:<8} {row['n']:>7} "
                     f"{100 * row['first_token']:>10.1f}% {100 * row['full']:>6.1f}%")
    return "\n".join(lines)
