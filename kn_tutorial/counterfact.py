"""Reading the real CounterFact benchmark (Meng et al., 2022) from a local JSON file.

CounterFact is a list of cases; each asks to rewrite one fact and carries the prompts that score
the edit (the same schema as Atlas-CounterFact, `kn_tutorial.atlas.counterfact`):

    {"case_id": 0,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                           "target_new": {"str": "English"}, "target_true": {"str": "French"}, ...},
     "paraphrase_prompts": [...], "neighborhood_prompts": [...], "generation_prompts": [...], ...}

The ROME authors host the file at COUNTERFACT_URL (about 20,000 cases). Nothing here downloads it:
fetch it yourself where there is a network (e.g. on Colab: `!wget <COUNTERFACT_URL>`) and pass its
path to `load_counterfact_json`. `kn_tutorial.evaluation` scores either file.
"""
from __future__ import annotations

import json
from pathlib import Path

COUNTERFACT_URL = "https://rome.baulab.info/data/dsets/counterfact.json"

REQUIRED = ("requested_rewrite", "paraphrase_prompts", "neighborhood_prompts")
REWRITE_KEYS = ("prompt", "subject", "target_new", "target_true")


def check_case(case: dict, where: str = "case") -> None:
    """A clear error when a case lacks what the evaluation reads."""
    missing = [k for k in REQUIRED if k not in case]
    if missing:
        raise ValueError(f"{where} lacks {missing}; is this a CounterFact file?")
    rewrite = case["requested_rewrite"]
    missing = [k for k in REWRITE_KEYS if k not in rewrite]
    if missing:
        raise ValueError(f"{where}'s requested_rewrite lacks {missing}")
    if "{}" not in rewrite["prompt"]:
        raise ValueError(f"{where}'s prompt {rewrite['prompt']!r} has no '{{}}' for the subject")
    for key in ("target_new", "target_true"):
        if not isinstance(rewrite[key], dict) or not str(rewrite[key].get("str", "")).strip():
            raise ValueError(f"{where}'s {key} must be {{'str': <non-empty text>}}, got {rewrite[key]!r}")


def load_counterfact_json(path: str | Path, limit: int | None = None) -> list[dict]:
    """The cases of a CounterFact-style JSON file (a list of case dicts), checked.

    limit: keep only the first `limit` cases."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no CounterFact file at {path}. Download it where there is a network "
            f"(e.g. `wget {COUNTERFACT_URL}`) and pass its path; offline, use Atlas-CounterFact "
            "(kn_tutorial.atlas.counterfact.load_counterfact()).")
    try:
        cases = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); a partial download? Fetch it again") from err
    if not isinstance(cases, list):
        raise ValueError(f"{path} holds a {type(cases).__name__}, expected a list of cases")
    cases = cases[:limit] if limit is not None else cases
    for i, case in enumerate(cases):
        check_case(case, where=f"case {case.get('case_id', i)} of {path.name}")
    return cases
