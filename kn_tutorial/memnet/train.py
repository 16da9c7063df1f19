"""Training and evaluating memory networks on the Atlas stories, deterministically.

``make_task()`` builds the data once (tokenizer, vocabulary, encoded splits);
``train(task, TrainConfig(...))`` trains one MemN2N on it with a progress bar and
returns a ``TrainResult``; ``train_grid`` trains one model per (coefficient
function, hop count) pair. Same configuration, same numbers: every run seeds torch
and shuffles with its own generator, and trains on ``num_threads`` threads (1 by
default: these models are tiny, and one thread keeps floating-point sums in the same
order on every machine).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch
import torch.nn.functional as F

from kn_tutorial.progress import progress

from .data import Encoded, StoryConfig, Vocab, WordTokenizer, build_vocab, default_tokenizer, encode, make_splits
from .model import COEFFICIENTS, MemN2N

__all__ = ["Task", "make_task", "TrainConfig", "TrainResult", "train", "evaluate", "predict", "train_grid",
           "accuracy_table"]


@dataclass
class Task:
    """The data every run shares: tokenizer, vocabulary, and the encoded splits."""

    tokenizer: WordTokenizer
    vocab: Vocab
    train: Encoded
    test: Encoded
    story_config: StoryConfig

    @property
    def max_memories(self) -> int:
        return self.train.stories.shape[1]

    @property
    def max_words(self) -> int:
        return self.train.stories.shape[2]

    def encode(self, examples) -> Encoded:
        """Encode more examples with this task's tokenizer, vocabulary and padding."""
        return encode(examples, self.tokenizer, self.vocab, self.max_memories, self.max_words)

    def __repr__(self) -> str:
        return (f"Task(vocab={len(self.vocab)}, train={len(self.train)} questions, "
                f"test={len(self.test)} questions, memories<={self.max_memories}, words<={self.max_words})")


@lru_cache(maxsize=4)
def make_task(n_train: int = 12000, n_test: int = 1000, seed: int = 0,
              story_config: StoryConfig = StoryConfig(), pairs: tuple | None = None) -> Task:
    """Stories for training (`n_train`) and testing (`n_test`), 2 questions each.

    `pairs`: a tuple of (city, country) to build a smaller world from (for quick tests);
    the vocabulary always covers the whole Atlas world."""
    train_ex, test_ex = make_splits(n_train, n_test, seed=seed, cfg=story_config, pairs=pairs)
    tokenizer = default_tokenizer()
    vocab = build_vocab(tokenizer)  # names + template words: every word a story can have
    train_enc = encode(train_ex, tokenizer, vocab, story_config.max_memories)
    M, J = train_enc.stories.shape[1:]
    test_enc = encode(test_ex, tokenizer, vocab, M, J)
    return Task(tokenizer, vocab, train_enc, test_enc, story_config)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Adam with a linearly decaying learning rate, gradient clipping."""

    hops: int = 2
    coef: str = "softmax"
    d: int = 32
    epochs: int = 6
    batch_size: int = 512
    lr: float = 0.04
    clip: float = 40.0          # the paper clips the gradient norm at 40
    temporal: bool = False
    init_std: float = 0.1       # the paper's N(0, 0.1) initialisation
    bias_init: float = 0.5      # score bias: lets ReLU/GELU start with memories firing
    seed: int = 0
    num_threads: int = 1


@dataclass
class TrainResult:
    model: MemN2N
    config: TrainConfig
    losses: list = field(default_factory=list)       # mean training loss per epoch
    accuracy: dict = field(default_factory=dict)     # evaluate(model, task.test)
    seconds: float = 0.0

    def __repr__(self) -> str:
        acc = ", ".join(f"{k}: {v:.3f}" for k, v in self.accuracy.items())
        return (f"TrainResult(coef={self.config.coef!r}, hops={self.config.hops}, {acc}, "
                f"{self.seconds:.1f} s)")


@contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def predict(model: MemN2N, data: Encoded, batch_size: int = 1024):
    """(predicted ids [N], coefficients [N, hops, M]) in eval mode."""
    model.eval()
    preds, coefs = [], []
    for start in range(0, len(data), batch_size):
        out = model(data.stories[start:start + batch_size], data.queries[start:start + batch_size])
        preds.append(out.logits.argmax(-1))
        coefs.append(out.coefficients)
    return torch.cat(preds), torch.cat(coefs)


def evaluate(model: MemN2N, data: Encoded) -> dict:
    """Accuracies and where hop 1 looks.

    one_hop:         "Where is Mara?" about a real city
    two_hop:         "Which country is Mara in?" through a real Atlas city (the answer can
                     be read from the story, or recalled from the weights)
    two_hop_made_up: the same through a made-up town, whose country changes from story
                     to story (the answer can only be read)
    all:             every question
    hop1_support: how often the largest coefficient of hop 1 is on the sentence that
                  names the person
    """
    pred, coefs = predict(model, data)
    correct = (pred == data.answers).float()
    out = {}
    for name, sel in (("one_hop", (data.hops == 1) & ~data.made_up),
                      ("two_hop", (data.hops == 2) & ~data.made_up),
                      ("two_hop_made_up", (data.hops == 2) & data.made_up)):
        out[name] = correct[sel].mean().item() if sel.any() else float("nan")
    out["all"] = correct.mean().item()
    out["hop1_support"] = (coefs[:, 0].argmax(-1) == data.support[:, 0]).float().mean().item()
    return out


def train(task: Task, config: TrainConfig = TrainConfig(), desc: str | None = None) -> TrainResult:
    """Train one MemN2N on `task.train`, evaluate on `task.test`."""
    start = time.perf_counter()
    with _threads(config.num_threads):
        torch.manual_seed(config.seed)
        model = MemN2N(len(task.vocab), d=config.d, hops=config.hops, coef=config.coef,
                       max_memories=task.max_memories, temporal=config.temporal, init_std=config.init_std,
                       bias_init=config.bias_init)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        data = task.train
        n_batches = (len(data) + config.batch_size - 1) // config.batch_size
        total = config.epochs * n_batches
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / total)
        gen = torch.Generator().manual_seed(config.seed)
        losses = []
        bar = progress(range(config.epochs), desc=desc or f"{config.coef}, {config.hops} hop(s)")
        for _ in bar:
            model.train()
            order = torch.randperm(len(data), generator=gen)
            running = 0.0
            for b in range(n_batches):
                idx = order[b * config.batch_size:(b + 1) * config.batch_size]
                out = model(data.stories[idx], data.queries[idx])
                loss = F.cross_entropy(out.logits, data.answers[idx])
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
                opt.step()
                sched.step()
                with torch.no_grad():  # the padding row stays zero
                    for e in model.embeddings:
                        e.weight[0].zero_()
                running += loss.item()
            losses.append(running / n_batches)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        model.eval()
        accuracy = evaluate(model, task.test)
    return TrainResult(model, config, losses, accuracy, time.perf_counter() - start)


def train_grid(task: Task, coefs=COEFFICIENTS, hops=(1, 2, 3), **config) -> dict:
    """{(coef, hops): TrainResult} for every pair; extra keywords go to TrainConfig."""
    base = TrainConfig(**config)
    results = {}
    for coef in coefs:
        for k in hops:
            results[(coef, k)] = train(task, replace(base, coef=coef, hops=k))
    return results


def accuracy_table(results: dict, metric: str = "one_hop") -> str:
    """A plain-text table, coefficient functions down, hop counts across."""
    coefs = list(dict.fromkeys(c for c, _ in results))
    hops = sorted({k for _, k in results})
    w = max(10, len(metric) + 2)
    lines = [f"{metric:<{w}}" + "".join(f"{str(k) + (' hops' if k > 1 else ' hop'):>9}" for k in hops)]
    for c in coefs:
        row = "".join(f"{results[(c, k)].accuracy[metric]:>9.3f}" if (c, k) in results else f"{'-':>9}"
                      for k in hops)
        lines.append(f"{c:<{w}}{row}")
    return "\n".join(lines)
