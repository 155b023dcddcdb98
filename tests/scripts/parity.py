"""Rank script: distopt vs all_sum-averaged gradients + the matching mlx.optimizers optimizer.

Every configuration trains two copies of one model for STEPS steps on this rank's own
data: one with distopt, one with the reference (``all_sum(g) / N`` per parameter, then
the plain MLX optimizer on full parameters). Prints one ``PARITY {json}`` line per
configuration with exactness and the largest differences of parameters and state.
"""

import json
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

import distopt

STEPS = 20
SCHEDULE = optim.join_schedules([optim.linear_schedule(0.0, 0.05, 5), optim.cosine_decay(0.05, 15)], [5])

CONFIGS = {
    "sgd": (optim.SGD, distopt.SGD, dict(learning_rate=0.05)),
    "sgd_momentum": (optim.SGD, distopt.SGD, dict(learning_rate=0.05, momentum=0.9)),
    "sgd_dampening": (optim.SGD, distopt.SGD, dict(learning_rate=0.05, momentum=0.9, dampening=0.3)),
    "sgd_nesterov_wd": (optim.SGD, distopt.SGD, dict(learning_rate=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    "sgd_wd_schedule": (optim.SGD, distopt.SGD, dict(learning_rate=SCHEDULE, weight_decay=0.1)),
    "adagrad": (optim.Adagrad, distopt.Adagrad, dict(learning_rate=0.05)),
    "adagrad_eps_schedule": (optim.Adagrad, distopt.Adagrad, dict(learning_rate=SCHEDULE, eps=1e-4)),
    "adamax": (optim.Adamax, distopt.Adamax, dict(learning_rate=0.01)),
    "adamax_betas_schedule": (optim.Adamax, distopt.Adamax, dict(learning_rate=SCHEDULE, betas=[0.8, 0.99], eps=1e-6)),
}


class Net(nn.Module):
    """Odd sizes so shards split parameters in the middle; a list of layers too."""

    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(7, 13), nn.Linear(13, 11)]
        self.head = nn.Linear(11, 3)
        self.scale = mx.ones((5,))

    def __call__(self, x):
        for layer in self.layers:
            x = nn.relu(layer(x))
        return self.head(x) * self.scale[:3].sum()


def loss_fn(model, x, y):
    return nn.losses.mse_loss(model(x), y)


def max_diff(a, b):
    diffs = [mx.abs(u - v).max().item() for (_, u), (_, v) in zip(tree_flatten(a), tree_flatten(b))]
    return max(diffs) if diffs else 0.0


def trees_close(a, b, rtol=1e-5, atol=1e-5):
    """Equal within float32 rounding of a differently ordered sum, accumulated over the steps.

    Adagrad and Adamax divide by the gradient's own scale, so where the averaged
    gradient of an element is near zero its rounding difference (a few ulps) is
    magnified into up to ``lr * |dg| / eps`` of the step; 20 such steps stay below
    1e-5 with the learning rates used here.
    """
    return all(mx.allclose(u, v, rtol=rtol, atol=atol).item() for (_, u), (_, v) in zip(tree_flatten(a), tree_flatten(b)))


def trees_equal(a, b):
    fa, fb = tree_flatten(a), tree_flatten(b)
    same_keys = [k for k, _ in fa] == [k for k, _ in fb]
    return same_keys and all(mx.array_equal(u, v).item() and u.dtype == v.dtype for (_, u), (_, v) in zip(fa, fb))


def run(name, stage, group, bucket_bytes):
    mlx_cls, distopt_cls, kwargs = CONFIGS[name]
    n, rank = group.size(), group.rank()
    mx.random.seed(0)
    model, reference = Net(), Net()
    reference.update(model.parameters())
    opt = distopt_cls(**kwargs, group=group, stage=stage, bucket_bytes=bucket_bytes)
    ref_opt = mlx_cls(**kwargs)
    grad_fn = nn.value_and_grad(model, loss_fn)
    ref_grad_fn = nn.value_and_grad(reference, loss_fn)
    for step in range(STEPS):
        mx.random.seed(1000 + 17 * step + rank)
        x, y = mx.random.normal((6, 7)), mx.random.normal((6, 3))
        _, grads = grad_fn(model, x, y)
        opt.update(model, grads)
        _, ref_grads = ref_grad_fn(reference, x, y)
        ref_grads = nn.average_gradients(ref_grads, group=group)  # all_sum(g) / N, as MLX users do
        ref_opt.update(reference, ref_grads)
        mx.eval(model.parameters(), opt.state, reference.parameters(), ref_opt.state)
    state = opt.consolidated_state()
    report = opt.memory_report()
    return {
        "config": name,
        "stage": stage,
        "rank": rank,
        "size": n,
        "params_exact": trees_equal(model.parameters(), reference.parameters()),
        "state_exact": trees_equal(state, ref_opt.state),
        "params_close": trees_close(model.parameters(), reference.parameters()),
        "state_close": trees_close(state, ref_opt.state),
        "params_max_diff": max_diff(model.parameters(), reference.parameters()),
        "state_max_diff": max_diff(state, ref_opt.state),
        "state_keys_match": sorted(state) == sorted(ref_opt.state),
        "step": int(state["step"].item()),
        "lr": float(state["learning_rate"].item()),
        "ref_lr": float(ref_opt.state["learning_rate"].item()),
        "state_bytes": report["optimizer_state_bytes"],
        "state_bytes_unsharded": report["optimizer_state_bytes_unsharded"],
        "padded_elements": sum(b.padded_size - b.size for b in opt.layout.buffers.values()) if opt.layout else 0,
    }


def main():
    group = distopt.init()
    names = list(CONFIGS) if len(sys.argv) < 2 or sys.argv[1] == "all" else sys.argv[1].split(",")
    bucket_bytes = int(sys.argv[2]) if len(sys.argv) > 2 else 64 * 1024**2
    for name in names:
        for stage in (1, 2):
            print("PARITY " + json.dumps(run(name, stage, group, bucket_bytes)), flush=True)


if __name__ == "__main__":
    main()
