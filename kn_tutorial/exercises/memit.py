"""Checks for the exercises of chapter 7, "MEMIT: editing thousands of facts at once" (Meng et al., 2023).
Notation: W: [d_model, d_ff] with W k + b = value; keys K = [k_1 ... k_n] (here rows of [n, d_ff]),
residuals R = [r_1 ... r_n] ([n, d_model]), C = E[k kᵀ], λ = mom2_update_weight;
ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹.

    check_joint_update(joint_update)                      # the batched least-squares update
    check_rank_one_update(rank_one_update)                # one request, by Sherman-Morrison
    check_key_groups(key_groups)                          # which requests share a key
    check_layer_loop(layer_loop, model, tokenizer)        # the layer loop that spreads the residual

Each runs the student's function through `harness.call` (weights and inputs restored, a time
limit, the package's own function disabled) on several cases, one of them never shown in the
chapter. It returns True when the function matches the reference, prints a reminder and
returns None (nothing for a notebook to print) while the stub still raises NotImplementedError, and raises an ExerciseError
saying what differs otherwise.
"""
from __future__ import annotations

import copy

import torch

from .. import memit as reference
from .. import rome
from ..models import mlp_out_weight, module_name, n_layers
from ..weights import preserve
from .harness import NOT_DONE, ExerciseError, call, close, is_close, tensor_result

SOLVES = (reference.solve_update, rome.rank_one_update, rome.apply_rank_one, rome.lstsq_update)


def _problem(n: int, d_model: int = 5, d_ff: int = 12, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(300, d_ff, generator=g, dtype=torch.float64)
    mom2 = sample.T @ sample / 300
    keys = torch.randn(n, d_ff, generator=g, dtype=torch.float64)
    residuals = torch.randn(n, d_model, generator=g, dtype=torch.float64)
    return mom2.to(dtype), keys.to(dtype), residuals.to(dtype)


def check_joint_update(joint_update) -> bool | None:
    """joint_update(mom2 [d_ff, d_ff], keys [n, d_ff], residuals [n, d_model], lam) -> ΔW [d_model, d_ff]:
    1, 4 and 30 requests in float64, and 3 requests in float32 (not shown in the chapter)."""
    cases = [(n, lam, _problem(n, seed=n)) for n, lam in ((1, 2.0), (4, 0.5), (30, 10.0))]
    cases.append((3, 1.0, _problem(3, d_model=6, d_ff=9, seed=5, dtype=torch.float32)))
    for n, lam, (mom2, keys, residuals) in cases:
        got = call(joint_update, mom2, keys, residuals, lam, forbid=SOLVES, what="my_joint_update")
        if got is NOT_DONE:
            return None
        want = reference.solve_update(mom2, keys, residuals, lam)
        got = tensor_result(got, want.shape, "my_joint_update", "ΔW, [d_model, d_ff]")
        if not is_close(got, want, keys.dtype):
            m, k, r = mom2.double(), keys.double(), residuals.double()
            hint = ""
            if is_close(got, r.T @ k @ torch.linalg.inv(m + k.T @ k), keys.dtype):
                hint = "You left out λ: the prior term is λ·C."
            elif is_close(got, r.T @ k @ torch.linalg.inv(lam * m), keys.dtype):
                hint = "You left out K Kᵀ in the matrix you invert: it is λC + K Kᵀ."
            close(got, want, f"{n} requests, λ = {lam} ({keys.dtype})",
                  hint + " ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹ with K = keys.T ([d_ff, n]) and R = residuals.T.", keys.dtype)
    print("Correct: your update matches R Kᵀ (λC + KKᵀ)⁻¹ for 1, 4 and 30 requests, and in float32.")
    return True


def check_rank_one_update(rank_one_update) -> bool | None:
    """rank_one_update(mom2, k [d_ff], r [d_model], lam) -> ΔW, without solving against λC + kkᵀ;
    three values of λ on one problem and a second problem (not shown in the chapter)."""
    cases = [(lam, _problem(1, seed=7)) for lam in (1e-8, 0.5, 20.0)]
    cases.append((3.0, _problem(1, d_model=4, d_ff=7, seed=8, dtype=torch.float32)))
    for lam, (mom2, keys, residuals) in cases:
        got = call(rank_one_update, mom2, keys[0], residuals[0], lam, forbid=SOLVES, what="my_rank_one_update")
        if got is NOT_DONE:
            return None
        want = reference.solve_update(mom2, keys, residuals, lam)
        got = tensor_result(got, want.shape, "my_rank_one_update", "ΔW, [d_model, d_ff]")
        # λC + kkᵀ is nearly singular at small λ: the reference's own float64 error is ~1e-8 relative there
        factor = 1e3 if keys.dtype == torch.float64 else 1.0
        mom2, keys, residuals = mom2.double(), keys.double(), residuals.double()
        u = torch.linalg.solve(mom2, keys[0])
        hint = ""
        if is_close(got, torch.outer(residuals[0], u) / (u @ keys[0]), got.dtype, factor) and lam > 1e-6:
            hint = "You left out λ: it is ΔW = r uᵀ / (λ + uᵀk)."
        elif is_close(got, torch.outer(residuals[0], u) / (1 + lam * (u @ keys[0])), got.dtype, factor):
            hint = "Sherman-Morrison with A = λC gives λ + uᵀk in the denominator, not 1 + λ uᵀk."
        close(got, want, f"λ = {lam}", hint + " With u = C⁻¹k, Sherman-Morrison gives ΔW = r uᵀ / (λ + uᵀk).",
              got.dtype, factor=factor)
    print("Correct: one request gives ROME's direction C⁻¹k, scaled by 1 / (λ + kᵀC⁻¹k).")
    return True


REQUESTS = [
    {"prompt": "{} lies on the continent of", "subject": "Kuwait", "target_new": {"str": "Europe"}},
    {"prompt": "{} has its capital in", "subject": "Kuwait", "target_new": {"str": "Paris"}},
    {"prompt": "{} lies on the continent of", "subject": "Osaka", "target_new": {"str": "Africa"}},
    {"prompt": "The capital of {} is", "subject": "Kuwait", "target_new": {"str": "Lima"}},
    {"prompt": "The capital of {} is", "subject": "Peru", "target_new": {"str": "Oslo"}},
    {"prompt": "{} mostly speaks", "subject": "Peru", "target_new": {"str": "French"}},
]
UNSEEN = [  # a prefix before the subject, and a subject that contains another one
    {"prompt": "In {} people speak", "subject": "Peru", "target_new": {"str": "German"}},
    {"prompt": "{} is in", "subject": "New York", "target_new": {"str": "Asia"}},
    {"prompt": "In {} the currency is", "subject": "Peru", "target_new": {"str": "yen"}},
    {"prompt": "{} is in", "subject": "York", "target_new": {"str": "Africa"}},
    {"prompt": "{} speaks", "subject": "New York", "target_new": {"str": "Welsh"}},
]


def check_key_groups(key_groups) -> bool | None:
    """key_groups(requests) -> lists of request indices that share their key, in first-seen order;
    on the chapter's six requests and on five others with text before the subject."""
    for where, requests in (("the six requests above", REQUESTS), ("five other requests", UNSEEN)):
        got = call(key_groups, copy.deepcopy(requests), forbid=(reference.key_groups,), what="my_key_groups")
        if got is NOT_DONE:
            return None
        want = reference.key_groups([reference.as_request(r) for r in requests])
        if got is None:
            raise ExerciseError("my_key_groups returned None: did you forget the `return` statement? Expected a "
                                "list of lists of request indices.")
        try:
            got = [[int(i) for i in g] for g in got]
        except (TypeError, ValueError):
            raise ExerciseError(f"my_key_groups returned {got!r}; expected a list of lists of request indices.") from None
        if got != want:
            hint = ""
            if sorted(map(sorted, got)) == sorted(map(sorted, want)):
                hint = " The groups are right but not in first-seen order (or not sorted within a group)."
            raise ExerciseError(
                f"{where}: got {got}, expected {want}.{hint} The key is read at the subject's last token, so it "
                "depends on the text up to the end of the subject: prompt.split('{}')[0] + subject.")
    print(f"Correct: {reference.key_groups([reference.as_request(r) for r in REQUESTS])} on the six requests, "
          "and the five unseen ones grouped by their text up to the subject.")
    return True


# ---- the layer loop ------------------------------------------------------------------------------

LOOP_REQUESTS = REQUESTS[:3]


def _loop_inputs(model, tokenizer, layers, seed: int, lam: float):
    """(keys_at, hidden_at_last, solve, z) for `model` (a copy the loop may edit)."""
    reqs = [reference.as_request(r) for r in LOOP_REQUESTS]
    groups = reference.key_groups(reqs)
    last = layers[-1]

    def keys_at(layer):
        return reference.compute_keys(model, tokenizer, reqs, groups, layer, [""])

    def hidden_at_last():
        return reference.compute_residuals(model, tokenizer, reqs, groups, last)

    def solve(layer, keys, residuals):
        scale = keys.double().pow(2).mean()
        mom2 = scale * torch.eye(keys.shape[1], dtype=torch.float64)
        return reference.solve_update(mom2, keys, residuals, lam)

    g = torch.Generator().manual_seed(seed)
    h = hidden_at_last()
    z = h + 0.5 * h.norm(dim=1, keepdim=True) * torch.nn.functional.normalize(torch.randn(h.shape, generator=g), dim=1)
    return keys_at, hidden_at_last, solve, z


def reference_layer_loop(model, layers, z, keys_at, hidden_at_last, solve) -> dict:
    """MEMIT's loop (as in memit.edit): at each layer, fresh keys and fresh h at the last layer,
    the residual share (z − h) / (layers left), ΔW added before the next layer."""
    deltas = {}
    for i, layer in enumerate(layers):
        keys, h = keys_at(layer), hidden_at_last()
        delta = solve(layer, keys, (z - h) / (len(layers) - i))
        weight = mlp_out_weight(model, layer)
        with torch.no_grad():
            weight.add_(delta.to(weight.dtype))
        deltas[layer] = delta
    return deltas


def check_layer_loop(layer_loop, model, tokenizer) -> bool | None:
    """layer_loop(model, layers, z, keys_at, hidden_at_last, solve) edits `model` in place, layer by
    layer, and returns {layer: ΔW}. Checked on two layer ranges (one not in the chapter): the
    weights it leaves must match MEMIT's loop, and nothing else may change. The weights are
    snapshotted (on the CPU) and restored bit for bit after each run."""
    L = n_layers(model)
    for layers, seed in (((1, 2, 3), 0), ((0, L // 2), 1)):
        with preserve(model, offload=True):  # the reference's run, undone
            ref_args = _loop_inputs(model, tokenizer, layers, seed, lam=2.0)
            reference_layer_loop(model, layers, ref_args[3], *ref_args[:3])
            want = {layer: mlp_out_weight(model, layer).detach().clone() for layer in layers}
        allowed = {module_name(model, layer, "mlp_out") + ".weight" for layer in layers}
        with preserve(model, offload=True) as snapshot:  # the student's run, undone
            args = _loop_inputs(model, tokenizer, layers, seed, lam=2.0)
            got = call(layer_loop, model, layers, args[3], *args[:3], forbid=(reference.edit,), what="my_layer_loop")
            if got is NOT_DONE:
                return None
            changed = snapshot.changed()
            others = [name for name in changed if name not in allowed]
            if others:
                raise ExerciseError(f"layers {layers}: you changed {others[:3]}; only the MLP output weights of the "
                                    f"edited layers should change.")
            unchanged = [layer for layer in layers if module_name(model, layer, "mlp_out") + ".weight" not in changed]
            if unchanged:
                raise ExerciseError(f"layers {layers}: the weights of layer(s) {unchanged} did not change: add each ΔW "
                                    f"to mlp_out_weight(model, layer) in place (under torch.no_grad()) before the next "
                                    f"layer.")
            for layer in layers:
                close(mlp_out_weight(model, layer).detach(), want[layer],
                      f"layers {layers}, the weight of layer {layer} after your loop",
                      "At each layer read the keys and h (at the LAST edited layer) again on the model as edited so "
                      "far, and give this layer the share (z − h) / (number of layers left, this one included); add "
                      "ΔW to the weight before moving to the next layer.", torch.float32, factor=5)
            if not isinstance(got, dict):
                raise ExerciseError(f"my_layer_loop returned {type(got).__name__}; expected a dict {{layer: ΔW}}.")
            for layer in layers:
                if layer not in got:
                    raise ExerciseError(f"the returned dict has no ΔW for layer {layer}.")
                tensor_result(got[layer], tuple(want[layer].shape), f"ΔW of layer {layer}", "[d_model, d_ff]")
    print("Correct: your loop leaves the weights MEMIT's loop leaves, on two layer ranges (the weights are restored).")
    return True
