"""Train an MLP classifier on data generated here, data-parallel over any number of ranks.

    python examples/mlp.py                         # one process
    distopt launch -n 2 examples/mlp.py            # two ranks, same loss curve

The data: 16-dimensional Gaussian points labelled by a fixed random "teacher" network
(10 classes). The loss starts near ln(10) = 2.30 and falls as the MLP learns the teacher.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import distopt
from common import global_mean, local_rows, parser, progress_for, resume, save, setup


class MLP(nn.Module):
    """``depth`` hidden ReLU layers of width ``hidden``."""

    def __init__(self, dim_in, hidden, classes, depth=2):
        super().__init__()
        sizes = [dim_in] + [hidden] * depth
        self.layers = [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        self.head = nn.Linear(hidden, classes)

    def __call__(self, x):
        for layer in self.layers:
            x = nn.relu(layer(x))
        return self.head(x)


def make_data(n, dim, classes, seed):
    """``n`` points and the labels a random two-layer teacher gives them (NumPy, deterministic)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    w1 = rng.standard_normal((dim, 8)).astype(np.float32)
    w2 = rng.standard_normal((8, classes)).astype(np.float32)
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=1).astype(np.int32)
    return x, y


def batches(x, y, batch_size, seed):
    """Endless global batches: a fresh permutation of the data every epoch."""
    epoch = 0
    while True:
        order = np.random.default_rng(seed + 1000 + epoch).permutation(len(x))
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            yield mx.array(x[idx]), mx.array(y[idx])
        epoch += 1


def loss_fn(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def main():
    p = parser(__doc__.split("\n")[0], steps=200, batch_size=256, lr=3e-3)
    p.add_argument("--hidden", type=int, default=128, help="hidden width (default 128)")
    args = p.parse_args()
    group, _ = setup(args)

    dim, classes = 16, 10
    x, y = make_data(8192, dim, classes, args.seed)
    mx.random.seed(args.seed)  # the same initial weights on every rank
    model = MLP(dim, args.hidden, classes)
    optimizer = distopt.Adamax(learning_rate=args.lr)
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    start = resume(args, model, optimizer)
    data = batches(x, y, args.batch_size, args.seed)
    for _ in range(start):  # skip the batches already trained on
        next(data)
    progress = progress_for(args, group, optimizer, start, unit="samples")
    progress.log(f"MLP {dim}-{args.hidden}-{args.hidden}-{classes}, {group.size()} rank(s), global batch {args.batch_size}")

    for step in range(start + 1, args.steps + 1):
        xb, yb = next(data)
        loss, grads = loss_and_grad(model, local_rows(xb, group), local_rows(yb, group))
        optimizer.update(model, grads)
        loss = global_mean(loss, group)
        mx.eval(loss, model.parameters(), optimizer.state)
        progress.update(step, loss.item(), tokens=args.batch_size)
        if args.checkpoint_dir and args.save_every and step % args.save_every == 0:
            save(args.checkpoint_dir, step, model, optimizer)
    progress.close()
    if args.checkpoint_dir and args.steps > start and not (args.save_every and args.steps % args.save_every == 0):
        save(args.checkpoint_dir, args.steps, model, optimizer)

    accuracy = mx.mean(mx.argmax(model(mx.array(x[:2048])), axis=1) == mx.array(y[:2048])).item()
    progress.log(f"train accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
