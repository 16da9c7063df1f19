"""End-to-end memory networks on Atlas stories (chapter 2 of the book).

Sukhbaatar et al. (2015) read a story into memory slots and answer a question by
attending over them: ``MN(x) = softmax(x K^T) V``. A transformer's FFN layer is the
same read with ``f`` (ReLU/GELU) in place of the softmax: ``FF(x) = f(x K^T) V``
(Geva et al., 2021). This package trains one on stories about the Atlas world and
compares the two kinds of coefficient.

    data      stories, questions, the word-level tokenizer, train/test splits
    model     MemN2N: position encoding, adjacent weight tying, coefficient functions
    train     deterministic training and evaluation (accuracy by question kind)
    analysis  what the hops look at, softmax vs ReLU/GELU statistics, read-or-recall,
              the same statistics for a real FFN layer
    plots     figures and the explorer widget

Quick start::

    from kn_tutorial.memnet import make_task, train, TrainConfig
    task = make_task()
    result = train(task, TrainConfig(hops=2, coef="softmax"))
    result.accuracy   # {'one_hop': ..., 'two_hop': ..., 'two_hop_made_up': ..., ...}
"""
from .data import *  # noqa: F401,F403
from .model import *  # noqa: F401,F403
from .train import *  # noqa: F401,F403
from .analysis import *  # noqa: F401,F403
