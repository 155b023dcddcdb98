"""Rank script: the whole training step under ``mx.compile`` equals the eager step.

For each configuration, two copies of one model train for STEPS steps on this rank's
data, one step function called eagerly and the same one compiled as mlx-lm compiles
its step (``inputs=outputs=[model.state, opt.state]``). Prints one ``COMPILE {json}``
line per configuration.
"""

import json
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

import distopt

STEPS = 5
SCHEDULE = optim.cosine_decay(0.02, 10)
CONFIGS = {
    "adamax_stage1": (mx.float32, dict(learning_rate=0.01)),
    "adamax_stage2_buckets_schedule": (mx.float32, dict(learning_rate=SCHEDULE, stage=2, bucket_bytes=256)),
    "bf16_master_clip_skip": (mx.bfloat16, dict(learning_rate=0.01, master_weights=True, max_norm=0.1, skip_nonfinite=True)),
}
BAD_STEP, BAD_RANK = 2, 1  # this rank's batch holds an inf at this step (a skipped step)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(9, 21), nn.Linear(21, 5)]

    def __call__(self, x):
        return self.layers[1](nn.relu(self.layers[0](x)))


def loss_fn(model, x, y):
    return nn.losses.mse_loss(model(x).astype(mx.float32), y)


def train(dtype, kwargs, group, compiled):
    rank = group.rank()
    mx.random.seed(0)
    model = Net()
    model.set_dtype(dtype)
    opt = distopt.Adamax(**kwargs, group=group)
    opt.init(model.trainable_parameters())

    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        opt.update(model, grads)
        return loss

    if compiled:
        step = partial(mx.compile, inputs=[model.state, opt.state], outputs=[model.state, opt.state])(step)
    losses = []
    for i in range(STEPS):
        mx.random.seed(100 + 7 * i + rank)
        x, y = mx.random.normal((6, 9)), mx.random.normal((6, 5))
        if kwargs.get("skip_nonfinite") and i == BAD_STEP and rank == BAD_RANK:
            x = mx.where(mx.arange(x.size).reshape(x.shape) == 4, float("inf"), x)
        loss = step(x.astype(dtype), y)
        mx.eval(loss, model.parameters(), opt.state)
        losses.append(loss.item())
    return model.parameters(), opt.state, losses, opt


def train_accumulated(group, compiled, k=3):
    """GradientAccumulator: eager ``add`` vs compiled ``accumulate`` / ``release`` functions."""
    rank = group.rank()
    mx.random.seed(0)
    model = Net()
    opt = distopt.Adamax(0.01, group=group, max_norm=0.5)
    opt.init(model.trainable_parameters())
    acc = distopt.GradientAccumulator(k)
    acc.init(model.trainable_parameters())
    grad_fn = nn.value_and_grad(model, loss_fn)

    def micro(x, y):
        loss, grads = grad_fn(model, x, y)
        acc.accumulate(grads)
        return loss

    def last(x, y):
        loss, grads = grad_fn(model, x, y)
        opt.update(model, acc.release(grads))
        return loss

    if compiled:
        micro = partial(mx.compile, inputs=[model.state, acc.state], outputs=[model.state, acc.state])(micro)
        both = [model.state, opt.state, acc.state]
        last = partial(mx.compile, inputs=both, outputs=both)(last)
    losses = []
    for i in range(STEPS * k):
        mx.random.seed(300 + 7 * i + rank)
        x, y = mx.random.normal((4, 9)), mx.random.normal((4, 5))
        if compiled:
            loss = (last if i % k == k - 1 else micro)(x, y)
        else:
            loss, grads = grad_fn(model, x, y)
            grads = acc.add(grads)
            if grads is not None:
                opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state, acc.state)
        losses.append(loss.item())
    return model.parameters(), opt.state, losses, opt


def compare(a, b):
    fa, fb = tree_flatten(a), tree_flatten(b)
    if [k for k, _ in fa] != [k for k, _ in fb]:
        return False, float("inf")
    diff = max(mx.abs(u.astype(mx.float32) - v.astype(mx.float32)).max().item() for (_, u), (_, v) in zip(fa, fb))
    return all(u.dtype == v.dtype and mx.array_equal(u, v).item() for (_, u), (_, v) in zip(fa, fb)), diff


def main():
    group = distopt.init()
    for name in [*CONFIGS, "accumulate_3_clip"]:
        if name in CONFIGS:
            params, state, losses, opt = train(*CONFIGS[name], group, compiled=False)
            c_params, c_state, c_losses, c_opt = train(*CONFIGS[name], group, compiled=True)
        else:
            params, state, losses, opt = train_accumulated(group, compiled=False)
            c_params, c_state, c_losses, c_opt = train_accumulated(group, compiled=True)
        params_equal, params_diff = compare(params, c_params)
        state_equal, state_diff = compare(state, c_state)
        result = {
            "config": name,
            "rank": group.rank(),
            "size": group.size(),
            "params_equal": params_equal,
            "params_max_diff": params_diff,
            "state_equal": state_equal,
            "state_max_diff": state_diff,
            "losses": losses,
            "compiled_losses": c_losses,
            "step": c_opt.step.item(),
            "skipped": c_opt.skipped_steps,
            "params_moved": not compare(params, Net().parameters())[0],
        }
        print("COMPILE " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
