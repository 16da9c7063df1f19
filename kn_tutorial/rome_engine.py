"""How ROME's v* is optimised fast (the definition: `rome`; Meng et al., 2022, "Locating and
Editing Factual Associations in GPT", section 3.1).

None of this changes what ROME computes; `rome.compute_v_star_naive` runs the optimisation
literally (every Adam step a full forward pass of every prompt, δ added to the MLP output by a
hook), and the tests hold the fast path to it.

1. One batch. The prefixed rewrite prompts (each followed by the target's tokens but its last)
   and the KL prompts are the rows of one batch, run together every step.
2. Only what depends on δ. δ is added to the MLP output of `layer` at the subject's last token,
   so the tokens before that position and the blocks up to `layer` cannot change between steps:
   one forward pass before the first step records them (the input of block `layer` + 1 and a KV
   cache), and each step runs only blocks `layer` + 1 on, from the subject's last token on
   (suffix.run_from_block), reading the logits at the answers and after the KL prompts only:
   the last block's MLP, the final norm and the unembedding run at those positions alone
   (run_from_block's `read`; each works on one position, and nothing later reads the others).
3. k* from the same pass. The rewrite rows are `rome.compute_k_star`'s prefixed prompts followed
   by target tokens, which the key at the subject's last token cannot see (attention is causal):
   the pass before the first step records that key too, and `rome.edit` takes k* from it instead
   of running the prompts again (the same numbers to float rounding; `compute_k_star` stays the
   definition, and the tests hold the two together).

The loss terms `kl_per_row` and `decay_term` (the objective's KL and weight decay, in the forms
`EditHparams` names) live here too, below both ROME and MEMIT, whose engine uses them as well;
`rome` re-exports them. The hyper-parameters are any object with the v* fields of `EditHparams`:
the engine sits below the definition and does not import it.
"""
from __future__ import annotations

import torch

from .hooks import Recorder, patch
from .kv_cache import output_cache
from .models import get_device
from .scoring import pad_rows, target_ids
from .suffix import left_pad_past, run_from_block
from .tokens import subject_span
from .weights import frozen


def kl_per_row(after: torch.Tensor, before: torch.Tensor, direction: str) -> torch.Tensor:
    """KL between next-token distributions given as log-probabilities [rows, vocab]; one value per row.

    direction "after||before" (the papers' code) is KL(P_after ‖ P_before) = Σ P_after (log P_after −
    log P_before); "before||after" the reverse. torch.nn.functional.kl_div(input, target) sums
    P_target (log P_target − input), so the papers' `kl_div(kl_distr_init, kl_log_probs)` (input: the
    log-probabilities before δ, target: after) is KL(after ‖ before)."""
    first, second = (after, before) if direction == "after||before" else (before, after)
    return torch.nn.functional.kl_div(second, first, log_target=True, reduction="none").sum(-1)


def decay_term(hparams, delta_norm: torch.Tensor, base_norm: torch.Tensor) -> torch.Tensor:
    """v_weight_decay · ‖δ‖^decay_power / ‖h‖² (decay_power 1: the papers' code, ‖δ‖ not squared)."""
    return hparams.v_weight_decay * delta_norm ** hparams.decay_power / base_norm ** 2


def _last_subject_positions(tokenizer, prompts: list[str], subject: str) -> list[int]:
    # The prefix may mention the subject too: the request's own occurrence is the last one.
    return [subject_span(tokenizer, p, subject, occurrence=-1)[1] - 1 for p in prompts]


def _batch(tokenizer, rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_rows(rows, tokenizer.eos_token_id, device)


def _v_star(model, tokenizer, prompt, subject, target, layer, prefixes, hparams,
            naive: bool) -> tuple[torch.Tensor, list[dict], torch.Tensor]:
    """(δ, losses per evaluation, k*) of `rome.compute_v_star` (naive=False) or `rome.compute_v_star_naive`
    (naive=True: every step a full forward pass with δ added to the MLP output by a hook).

    k* is read from the forward pass before the first step (point 3 of the module docstring): the
    rewrite rows are the prefixed prompts of `rome.compute_k_star` followed by target tokens, which
    attention (causal) hides from the key at the subject's last token."""
    device = get_device(model)
    target_tokens = target_ids(tokenizer, target)
    rewrite_prompts = [p + prompt.replace("{}", subject) for p in prefixes]
    kl_prompts = [k.replace("{}", subject) for k in hparams.kl_prompts]
    rows, answer_positions = [], []
    for text in rewrite_prompts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append(ids + target_tokens[:-1])
        answer_positions.append(list(range(len(ids) - 1, len(ids) - 1 + len(target_tokens))))
    kl_rows = [tokenizer(k, add_special_tokens=False)["input_ids"] for k in kl_prompts]
    input_ids, mask = _batch(tokenizer, rows + kl_rows, device)
    lookup = torch.tensor(_last_subject_positions(tokenizer, rewrite_prompts + kl_prompts, subject), device=device)
    row_index = torch.arange(len(lookup), device=device)
    n_rewrite = len(rows)
    kl_index = n_rewrite + torch.arange(len(kl_rows), device=device)
    kl_last = torch.tensor([len(r) - 1 for r in kl_rows], device=device)
    answer_rows = torch.tensor([i for i, pos in enumerate(answer_positions) for _ in pos], device=device)
    answer_cols = torch.tensor([c for pos in answer_positions for c in pos], device=device)
    answer_tokens = torch.tensor(target_tokens * n_rewrite, device=device)

    sites = [("mlp_out", layer), ("hidden", layer), ("key", layer)]
    with torch.no_grad(), Recorder(model, sites) as rec:
        out = model(input_ids=input_ids, attention_mask=mask, use_cache=not naive)
    logits = out.logits
    base_out = rec[("mlp_out", layer)][0, lookup[0]].float()
    k_star = rec[("key", layer)][row_index[:n_rewrite], lookup[:n_rewrite]].float().mean(0)  # = rome.compute_k_star
    kl_before = torch.log_softmax(logits[kl_index, kl_last].float(), -1)

    if naive:
        def add_delta(out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[row_index, lookup] = out[row_index, lookup] + delta.to(out.dtype)
            return out

        def run() -> tuple[torch.Tensor, torch.Tensor]:  # logits at the answers, at the KL positions
            with patch(model, "mlp_out", layer, add_delta):
                logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
            return logits[answer_rows, answer_cols], logits[kl_index, kl_last]
    else:
        # Nothing before the subject's last token, nor below block layer + 1, depends on δ.
        lengths = mask.sum(1)
        suffix_len = lengths - lookup
        width = int(suffix_len.max())
        at = (lookup[:, None] + torch.arange(width, device=device)[None]).clamp(max=input_ids.shape[1] - 1)
        block_input = rec[("hidden", layer)][row_index[:, None], at].detach()  # [B, width, d] input of block layer+1
        cache = output_cache(out)
        kv = [None if i <= layer else (keys, values) for i, (keys, values, *_) in enumerate(cache)]
        past, _ = left_pad_past(kv, lookup)

        # only the answers' and the KL positions' logits are read (the last block's MLP runs there only)
        read = (torch.cat([answer_rows, kl_index]),
                torch.cat([answer_cols - lookup[answer_rows], kl_last - lookup[kl_index]]))
        n_answers = len(answer_rows)

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            first = block_input[:, :1] + delta.to(block_input.dtype)  # δ at the subject's last token
            logits = run_from_block(model, layer + 1, torch.cat([first, block_input[:, 1:]], 1), past, lookup,
                                    suffix_len, read=read).float()
            return logits[:n_answers], logits[n_answers:]

    delta = torch.zeros(base_out.shape[0], device=device, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    max_norm = hparams.clamp_norm_factor * base_out.norm()
    losses = []

    with frozen(model):
        for step in range(hparams.v_steps + 1):
            answer_logits, kl_logits = run()
            logprobs = torch.log_softmax(answer_logits, -1)
            token_logprobs = logprobs.gather(1, answer_tokens[:, None]).squeeze(1).view(n_rewrite, -1)
            nll = -token_logprobs.mean(1).mean()
            kl_after = torch.log_softmax(kl_logits, -1)
            kl = kl_per_row(kl_after, kl_before, hparams.kl_direction).mean()  # mean over the KL prompts
            decay = decay_term(hparams, delta.norm(), base_out.norm())
            loss = nll + hparams.kl_factor * kl + decay
            losses.append({"nll": nll.item(), "kl": kl.item(), "decay": decay.item(), "loss": loss.item(),
                           "delta_norm": delta.norm().item(), "p_target": token_logprobs.sum(1).exp().mean().item()})
            if losses[-1][hparams.stop_on] < hparams.stop_threshold or step == hparams.v_steps:
                break  # checked before the step; the last evaluation takes no step
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    return delta.detach(), losses, k_star
