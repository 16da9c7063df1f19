"""The hyper-parameters every weight edit shares, and reading them from the shipped JSON files.

ROME (Meng et al., 2022, "Locating and Editing Factual Associations in GPT") and MEMIT
(Meng et al., 2023, "Mass-Editing Memory in a Transformer") both find their new values by the
same optimisation (v* in ROME, z in MEMIT: δ added at the subject, a KL term, a clamped norm,
random prefixes) and both need the second moment C = E[k kᵀ] of the keys. `EditHparams` holds
those fields once; `rome.RomeHparams` and `memit.MemitHparams` add what is their own (the layer
or layers, ROME's ridge, MEMIT's λ and batching). The shared fields are keyword-only.

The objective of δ follows the papers' reference code by default (kmeng01/rome
`rome/compute_v.py`, kmeng01/memit `memit/compute_z.py`); the other forms are labelled options:

    loss(δ) = NLL(o*) + kl_factor · KL + v_weight_decay · ‖δ‖^decay_power / ‖h‖²

- `kl_direction`: "after||before" (the papers' code: KL(P_after ‖ P_before)) or "before||after"
  (the form this book used before, KL(P_before ‖ P_after));
- `decay_power`: 1 (the papers' code, ‖δ‖ not squared, in ROME and in MEMIT) or 2 (‖δ‖², the form
  MEMIT here used before; h is ROME's MLP output m or MEMIT's residual h at the subject);
- `stop_on`: "loss" (the papers' code: stop once the total loss is below `stop_threshold`, checked
  before the step) or "nll" (stop on the prediction loss alone, the form both methods here used
  before); `stop_threshold`: 5e-2 as in the papers' code.

The KL is read after the whole KL prompt ("{} is a"); the papers' code reads it at the subject's
last token of that prompt, a difference these options do not cover.

`v_steps` counts Adam updates: the loss is evaluated up to v_steps + 1 times and the last
evaluation takes no step. The reference's `v_num_grad_steps` = N evaluates N times and updates at
most N − 1 times, so it corresponds to v_steps = N − 1 (the shipped files keep the papers' N).

`for_model(name)` reads `kn_tutorial/hparams/<method>/<model name>.json` (the papers' values for
GPT-2 and GPT-J, and the Atlas model's, each file saying where its numbers came from).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

HPARAMS_ROOT = Path(__file__).parent / "hparams"


def read_hparams(directory: Path, name: str, method: str, example: str) -> dict:
    """The JSON of `directory/<model name>.json` as a dict (its "_comment" dropped), with a clear
    error listing the known models when there is none. The shipped Atlas model is "atlas".

    A model in a local folder may carry its own: `<folder>/<method>_hparams.json` (e.g.
    `rome_hparams.json`) is read first when `name` is that folder."""
    name = str(name).rstrip("/")
    if name.endswith("atlas/model"):  # the shipped Atlas model's _name_or_path is its folder
        name = "atlas"
    path = directory / f"{Path(name).name}.json"
    own = Path(name).expanduser() / f"{method.lower()}_hparams.json"
    if name != "atlas" and own.is_file():
        path = own
    if not path.exists():
        known = sorted(p.stem for p in directory.glob("*.json"))
        raise ValueError(f"no {method} hyper-parameters for {name!r}; known: {known}, or a local model folder's "
                         f"{method.lower()}_hparams.json. Pass {example} yourself.")
    data = json.loads(path.read_text())
    data.pop("_comment", None)
    return data


def _as_tuples(value):
    """JSON lists as (nested) tuples, so a loaded value equals the dataclass default's type."""
    return tuple(_as_tuples(x) for x in value) if isinstance(value, list) else value


@dataclass(kw_only=True)
class EditHparams:
    """The fields ROME's v* and MEMIT's z optimisation share (ROME's defaults), and the C statistics."""
    v_lr: float = 0.5
    v_steps: int = 20
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ factor · ‖h‖
    kl_factor: float = 0.0625
    kl_prompts: tuple[str, ...] = ("{} is a",)
    prefixes: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))  # (length, how many) of random prefixes
    mom2_corpus: str = "atlas"
    mom2_n_samples: int = 4000
    seed: int = 0
    # The objective of δ (module docstring): the papers' code by default, the other forms as options.
    kl_direction: str = "after||before"  # papers' code: KL(P_after ‖ P_before); or "before||after"
    decay_power: int = 1  # v_weight_decay · ‖δ‖^p / ‖h‖²: 1 the papers' code, 2 the squared variant
    stop_on: str = "loss"  # stop once this is < stop_threshold: "loss" (total, papers' code) or "nll"
    stop_threshold: float = 5e-2  # the papers' code: 5e-2

    METHOD: ClassVar[str] = ""  # "ROME", "MEMIT": names the folder hparams/<method>/ and the errors
    EXAMPLE: ClassVar[str] = ""  # how to construct one by hand, for the error when no file exists

    KL_DIRECTIONS: ClassVar[tuple[str, ...]] = ("after||before", "before||after")  # the papers' code first
    DECAY_POWERS: ClassVar[tuple[int, ...]] = (1, 2)
    STOP_ON: ClassVar[tuple[str, ...]] = ("loss", "nll")

    @classmethod
    def directory(cls) -> Path:
        return HPARAMS_ROOT / cls.METHOD.lower()

    @classmethod
    def for_model(cls, name: str):
        """The hyper-parameters stored in `hparams/<method>/<name>.json` (JSON lists read as tuples)."""
        data = read_hparams(cls.directory(), name, cls.METHOD, cls.EXAMPLE)
        return cls(**{key: _as_tuples(value) for key, value in data.items()})
