"""Shared by the checkpoint tests and their rank scripts: a model, its data, exact references.

Every rank trains on the same batch, and gradients are rounded to a few significant
bits, so the mean over any number of ranks is exactly the gradient (k * g is exact for
k <= 8, and (k * g) / k == g). Training at any world size is then bit-for-bit the
plain ``mlx.optimizers`` run on one process, which is the uninterrupted reference.
"""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

import distopt

K, J = 3, 3  # steps before the checkpoint, steps after it
SCHEDULE = optim.join_schedules([optim.linear_schedule(0.0, 0.05, 2), optim.cosine_decay(0.05, 10)], [2])


def settings(name):
    """(plain class, distopt class, arguments) of each tested optimizer."""
    return {
        "adamax": (optim.Adamax, distopt.Adamax, dict(learning_rate=SCHEDULE, betas=[0.8, 0.99], eps=1e-6)),
        "sgd": (optim.SGD, distopt.SGD, dict(learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
        # fp32 master shards of the bfloat16 parameter: state keys m, v and "master"; no plain MLX twin
        "master": (None, distopt.Adamax, dict(learning_rate=0.01, master_weights=True, skip_nonfinite=True)),
    }[name]


def make_optimizer(name, plain=False, **extra):
    plain_cls, dist_cls, kwargs = settings(name)
    only_distopt = {"bucket_bytes": 400, "shard_weights": None}
    only_distopt.update({k: v for k, v in extra.items() if k in only_distopt})
    kwargs = {**kwargs, **{k: v for k, v in extra.items() if k not in only_distopt}}
    return plain_cls(**kwargs) if plain else dist_cls(**kwargs, **only_distopt)


class Net(nn.Module):
    """Odd sizes (shards split parameters), a list of layers, and one bfloat16 parameter."""

    def __init__(self, hidden=13):
        super().__init__()
        self.layers = [nn.Linear(7, hidden), nn.Linear(hidden, 11)]
        self.head = nn.Linear(11, 3)
        self.scale = mx.ones((5,), dtype=mx.bfloat16)

    def __call__(self, x):
        for layer in self.layers:
            x = nn.relu(layer(x))
        return self.head(x) * self.scale[:3].astype(mx.float32)


def make_model(seed=0, hidden=13):
    mx.random.seed(seed)
    model = Net(hidden)
    mx.eval(model.parameters())
    return model


def batch(t):
    k1, k2 = mx.random.split(mx.random.key(1000 + t))
    return mx.random.normal((16, 7), key=k1), mx.random.normal((16, 3), key=k2)


def _round(g):
    """Keep 8 significant bits of a float32 and 5 of a bfloat16 gradient (exact sums of <= 8 copies)."""
    if g.dtype == mx.float32:
        return mx.view(mx.view(g, mx.uint32) & 0xFFFF0000, mx.float32)
    return mx.view(mx.view(g.astype(mx.float32), mx.uint32) & 0xFFF80000, mx.float32).astype(g.dtype)


def grads(model, t):
    x, y = batch(t)
    _, g = nn.value_and_grad(model, lambda m: nn.losses.mse_loss(m(x), y))(model)
    return tree_map(_round, g)


def train(model, opt, start, stop):
    for t in range(start, stop):
        opt.update(model, grads(model, t))
        mx.eval(model.parameters(), opt.state)


def reference(name, steps=K + J):
    """The uninterrupted run: ``(model, state in mlx layout, fp32 masters)``.

    Plain mlx.optimizers on one process; for "master", which MLX lacks, distopt at this
    world size (its math does not depend on the world size).
    """
    model, opt = make_model(), make_optimizer(name, plain=name != "master")
    train(model, opt, 0, steps)
    state = full_state(opt)
    masters = opt.master_parameters() if name == "master" else {}
    mx.eval(state, masters)
    return model, state, masters


def full_state(opt):
    """The state in mlx.optimizers layout (collective for a sharded optimizer)."""
    return opt.consolidated_state() if isinstance(opt, distopt.ShardedOptimizer) else opt.state


def differences(model, opt, ref):
    """Names of the parameters, state leaves and masters that are not bit-for-bit equal to ``ref``."""
    ref_model, ref_state, ref_masters = ref
    state = full_state(opt)
    masters = opt.master_parameters() if ref_masters else {}
    mx.eval(state, masters)  # a sharded optimizer's consolidated state is lazy collectives: evaluate on every rank
    bad = []
    pairs = (("param:", model.parameters(), ref_model.parameters()), ("state:", state, ref_state), ("master:", masters, ref_masters))
    for prefix, a, b in pairs:
        fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
        if fa.keys() != fb.keys():
            bad.append(f"{prefix}keys {sorted(set(fa) ^ set(fb))}")
        for k in sorted(fa.keys() & fb.keys()):
            if fa[k].dtype != fb[k].dtype or fa[k].shape != fb[k].shape or not mx.array_equal(fa[k], fb[k]).item():
                bad.append(prefix + k)
    return sorted(bad)
