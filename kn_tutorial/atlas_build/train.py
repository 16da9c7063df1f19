"""Training the Atlas model: a small GPT-2 (the real `GPT2LMHeadModel`) that knows the world.

`python -m kn_tutorial.atlas train` rebuilds the shipped weights: it trains the tokenizer,
then the model on sequences drawn from `atlas.corpus.SequenceSampler`, and writes
`kn_tutorial/atlas/model/` (config, safetensors weights, tokenizer, training report).
Everything is seeded and the number of CPU threads is fixed, so the same command on the
same machine gives the same weights.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ..atlas.corpus import SequenceSampler, all_training_sentences
from ..atlas.tokenizer import train_tokenizer
from ..atlas.world import World, load_world, make_world, place_names, sub_world
from ..models import atlas_model_dir
from ..progress import progress_bar

MODEL_DIR = atlas_model_dir()  # kn_tutorial/atlas/model/: the data package holds the shipped model


@dataclass
class TrainConfig:
    n_layer: int = 12
    n_embd: int = 192
    n_head: int = 4
    n_inner: int = 768
    vocab_size: int = 1024
    n_positions: int = 128
    steps: int = 4000
    batch_size: int = 48  # rows of `row_len` tokens, packed without padding
    row_len: int = 64
    bare_start: float = 0.5  # share of rows whose first sequence has no leading <|endoftext|>
    lr: float = 2e-3
    min_lr: float = 5e-5
    warmup: int = 200
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2  # the shipped model's; another thread count gives slightly different weights
    max_facts: int = 3
    same_subject: float = 0.6
    bf16: bool = True  # autocast matmuls to bfloat16 on CPU (AMX) or GPU; weights stay float32
    device: str = "cpu"  # the shipped weights are trained on CPU; "cuda" is for quick experiments
    # Corpus and world options (see corpus.py); the defaults are the shipped model's recipe.
    context: float = 0.5  # share of fact sentences with words before the subject
    context_style: str = "compositional"  # or "fixed": twelve fixed lead-ins
    preceding: float = 0.3  # share of sequences opening with an unrelated sentence
    lists: float = 0.2  # share of sequences opening with a list of subjects
    multi: float = 0.3  # share of further facts joined into the same sentence
    compose: float = 0.5  # share of further facts about the previous fact's object
    world_cities: int = 0  # 0: the shipped world; n: an in-memory world with n cities (make_world)
    world_max_per_country: int = 5
    world_countries: int = 0  # 0: every country; n: only n countries (seeded by `seed`) and their cities (sub_world)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_tokenizer(world: World, vocab_size: int, extra_texts: list[str] | None = None):
    names = place_names()
    texts = all_training_sentences(world) + list(extra_texts or []) + names + [" " + n for n in names]
    return train_tokenizer(texts, vocab_size)


def config_world(cfg: TrainConfig) -> World:
    """The world a config trains on: the shipped one, or `make_world(cfg.world_cities, ...)`, then
    only `cfg.world_countries` of its countries (`sub_world`) when that is not 0."""
    world = load_world() if cfg.world_cities == 0 else make_world(cfg.world_cities, cfg.world_max_per_country)
    return world if cfg.world_countries == 0 else sub_world(world, cfg.world_countries, cfg.seed)


def make_sampler(cfg: TrainConfig, world: World) -> SequenceSampler:
    return SequenceSampler(world, seed=cfg.seed, max_facts=cfg.max_facts, same_subject=cfg.same_subject,
                           context=cfg.context, context_style=cfg.context_style, preceding=cfg.preceding,
                           lists=cfg.lists, multi=cfg.multi, compose=cfg.compose)


def make_model(cfg: TrainConfig, tokenizer) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.n_inner,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(config)


class RowPacker:
    """Rows of exactly `row_len` tokens made by concatenating sampled sequences, as GPT-2 was
    trained: no padding is wasted, and later sequences in a row follow unrelated text.
    Some rows start without `<|endoftext|>`, so bare prompts look familiar too."""

    def __init__(self, sampler: SequenceSampler, tokenizer, row_len: int, bare_start: float):
        self.sampler, self.tokenizer = sampler, tokenizer
        self.row_len, self.bare_start = row_len, bare_start

    def row(self) -> list[int]:
        ids: list[int] = []
        while len(ids) < self.row_len:
            seq = self.tokenizer(self.sampler.text(), add_special_tokens=False)["input_ids"]
            if not ids and self.sampler.rng.random() < self.bare_start:
                seq = seq[1:]
            ids += seq
        return ids[: self.row_len]

    def batch(self, size: int) -> torch.Tensor:
        return torch.tensor([self.row() for _ in range(size)])


def train(cfg: TrainConfig | None = None, world: World | None = None, log_every: int = 500):
    """Train tokenizer and model; returns (model, tokenizer, log)."""
    cfg = cfg or TrainConfig()
    world = world or config_world(cfg)
    sampler = make_sampler(cfg, world)  # checks the corpus options before any work
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    started = time.time()
    tokenizer = make_tokenizer(world, cfg.vocab_size, sampler.tokenizer_texts())
    model = make_model(cfg, tokenizer).to(cfg.device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    packer = RowPacker(sampler, tokenizer, cfg.row_len, cfg.bare_start)
    log = []
    running = None
    bar = progress_bar(total=cfg.steps, desc="training Atlas")
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        input_ids = packer.batch(cfg.batch_size).to(cfg.device)
        with torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            log.append({"step": step + 1, "loss": round(running, 4), "seconds": round(time.time() - started, 1)})
    bar.close()
    model.eval().cpu()
    return model, tokenizer, {"config": asdict(cfg), "log": log, "seconds": round(time.time() - started, 1)}


def save(model, tokenizer, report: dict, directory: Path = MODEL_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    (directory / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
