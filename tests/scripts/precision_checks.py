"""Rank script: the training features of issue 4, checked against plain MLX references.

Prints one ``CHECK {json}`` line per check; tests/test_precision.py asserts on them.

- ``bf16``: a bf16 model with fp32 master shards tracks the fp32 run; plain
  ``mlx.optimizers`` on the same bf16 model drifts.
- ``clip``: ``max_norm`` equals ``mlx.optimizers.clip_grad_norm`` on the mean gradient.
- ``skip``: inf on one rank skips the step on every rank, nothing changes.
- ``loss_scale``: dynamic loss scaling on float16 backs off on overflow, then trains.
- ``accumulate``: k micro-batches equal one step on the concatenated batch, silently.
- ``bytes``: half-precision parameters are gathered in half the bytes; fp32 reduction doubles them.
"""

import json
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

import distopt


class Net(nn.Module):
    def __init__(self, width=24):
        super().__init__()
        self.layers = [nn.Linear(9, width), nn.Linear(width, 7)]
        self.head = nn.Linear(7, 3)

    def __call__(self, x):
        for layer in self.layers:
            x = nn.relu(layer(x))
        return self.head(x)


def loss_fn(model, x, y):
    return nn.losses.mse_loss(model(x).astype(mx.float32), y)


def make(dtype=mx.float32, seed=0, width=24):
    mx.random.seed(seed)
    model = Net(width)
    model.set_dtype(dtype)
    return model


def batch(step, rank, size=8, dtype=mx.float32):
    mx.random.seed(1000 + 31 * step + rank)
    x = mx.random.normal((size, 9))
    return x.astype(dtype), mx.sin(x[:, :3] * 2.0)


def mean_grads(grads, group):
    return tree_map(lambda g: mx.distributed.all_sum(g, group=group) / group.size(), grads)


def flat(tree):
    return mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in tree_flatten(tree)])


def max_diff(a, b):
    return mx.abs(flat(a) - flat(b)).max().item()


def equal(a, b):
    fa, fb = tree_flatten(a), tree_flatten(b)
    return [k for k, _ in fa] == [k for k, _ in fb] and all(
        u.dtype == v.dtype and mx.array_equal(u, v).item() for (_, u), (_, v) in zip(fa, fb)
    )


def check_bf16(group, steps=60, lr=3e-4):
    """Distance to the fp32 run, as a fraction of how far the fp32 run moved."""
    rank = group.rank()
    start = make().parameters()
    runs = {
        "fp32": (make(), distopt.Adamax(lr, group=group)),
        "master": (make(mx.bfloat16), distopt.Adamax(lr, group=group, master_weights=True)),
        "plain_bf16": (make(mx.bfloat16), optim.Adamax(lr)),
    }
    losses = {}
    for step in range(steps):
        x, y = batch(step, rank)
        for name, (model, opt) in runs.items():
            loss, grads = nn.value_and_grad(model, loss_fn)(model, x.astype(model.layers[0].weight.dtype), y)
            if isinstance(opt, optim.Optimizer) and not isinstance(opt, distopt.ShardedOptimizer):
                grads = mean_grads(grads, group)
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)
            losses[name] = loss.item()
    fp32 = runs["fp32"][0].parameters()
    moved = mx.sqrt(((flat(fp32) - flat(start)) ** 2).sum()).item()
    distance = {
        name: mx.sqrt(((flat(model.parameters()) - flat(fp32)) ** 2).sum()).item() / moved
        for name, (model, _) in runs.items()
    }
    master_opt = runs["master"][1]
    shard_dtypes = {k: sorted({str(part.dtype) for part in parts}) for k, parts in master_opt.state["shards"]["bfloat16"].items()}
    consolidated = master_opt.consolidated_state()
    masters = master_opt.master_parameters()
    return {
        "relative_distance": distance,
        "final_loss": losses,
        "param_dtype": str(runs["master"][0].layers[0].weight.dtype),
        "shard_dtypes": shard_dtypes,
        "consolidated_keys": sorted(k for k in consolidated if k not in ("step", "learning_rate")),
        "consolidated_state_dtypes": sorted({str(v.dtype) for k, v in tree_flatten(consolidated) if k not in ("step", "learning_rate")}),
        "consolidated_leaf_keys": sorted({k.rsplit(".", 1)[-1] for k, _ in tree_flatten(consolidated)}),
        "master_params_fp32": all(v.dtype == mx.float32 for _, v in tree_flatten(masters)),
        "master_rounds_to_params": equal(tree_map(lambda v: v.astype(mx.bfloat16), masters), runs["master"][0].parameters()),
    }


def check_clip(group, stage, max_norm=0.05, steps=6):
    """distopt with max_norm vs all_sum mean + mlx clip_grad_norm + mlx Adamax."""
    rank = group.rank()
    model, reference = make(), make()
    opt = distopt.Adamax(0.01, group=group, stage=stage, bucket_bytes=256, max_norm=max_norm)
    ref_opt = optim.Adamax(0.01)
    norms, clipped = [], []
    for step in range(steps):
        x, y = batch(step, rank)
        _, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        opt.update(model, grads)
        _, ref_grads = nn.value_and_grad(reference, loss_fn)(reference, x, y)
        ref_grads, ref_norm = optim.clip_grad_norm(mean_grads(ref_grads, group), max_norm)
        ref_opt.update(reference, ref_grads)
        mx.eval(model.parameters(), opt.state, reference.parameters(), ref_opt.state)
        norms.append([opt.last_grad_norm.item(), ref_norm.item()])
        clipped.append(ref_norm.item() > max_norm)
    return {
        "stage": stage,
        "norms": norms,
        "any_clipped": any(clipped),
        "params_max_diff": max_diff(model.parameters(), reference.parameters()),
        "state_max_diff": max_diff(opt.consolidated_state(), ref_opt.state),
        "steps": opt.step.item(),
    }


def check_skip(group, bad_rank=1, bad_step=2, steps=5, value=float("inf")):
    """A non-finite gradient on one rank: every rank skips that step, as if it never came."""
    rank = group.rank()
    model, reference = make(mx.bfloat16), make(mx.bfloat16)
    opt = distopt.Adamax(0.01, group=group, master_weights=True, skip_nonfinite=True)
    ref_opt = distopt.Adamax(0.01, group=group, master_weights=True, skip_nonfinite=True)
    before = after = None
    for step in range(steps):
        x, y = batch(step, rank, dtype=mx.bfloat16)
        _, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        if step == bad_step:
            before = (tree_map(lambda v: v, model.parameters()), tree_map(lambda v: v, opt.state))
            if rank == bad_rank:
                w = grads["layers"][1]["weight"]
                grads["layers"][1]["weight"] = mx.where(mx.arange(w.size).reshape(w.shape) == 5, value, w)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        if step == bad_step:
            after = (model.parameters(), tree_map(lambda v: v, opt.state))
            continue  # the reference never sees this batch
        _, ref_grads = nn.value_and_grad(reference, loss_fn)(reference, x, y)
        ref_opt.update(reference, ref_grads)
        mx.eval(reference.parameters(), ref_opt.state)
    unchanged_state = {k: v for k, v in after[1].items() if k not in ("skipped_steps", "grad_norm")}
    expected_state = {k: v for k, v in before[1].items() if k not in ("skipped_steps", "grad_norm")}
    return {
        "value": str(value),
        "skipped_steps": opt.skipped_steps,
        "step": opt.step.item(),
        "params_unchanged": equal(after[0], before[0]),
        "state_unchanged": equal(unchanged_state, expected_state),
        "then_equal_to_run_without_that_batch": equal(model.parameters(), reference.parameters())
        and equal(opt.state["shards"], ref_opt.state["shards"]),
    }


def check_loss_scale(group, steps=16):
    """float16 with a loss scale too large at first: overflow, back off, then learn."""
    rank = group.rank()
    model = make(mx.float16)
    scaler = distopt.DynamicLossScale(init_scale=2.0**20, growth_interval=4)
    opt = distopt.Adamax(0.01, group=group, master_weights=True, loss_scale=scaler)
    opt.init(model.trainable_parameters())
    scales, skipped, losses = [], [], []
    for step in range(steps):
        x, y = batch(0, rank, dtype=mx.float16)
        scale = opt.loss_scale
        loss, grads = nn.value_and_grad(model, lambda m, x, y: loss_fn(m, x, y) * scale)(model, x, y)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(loss.item() / scale.item())
        scales.append(opt.loss_scale.item())
        skipped.append(opt.skipped_steps)
    finite = all(mx.isfinite(v).all().item() for _, v in tree_flatten(model.parameters()))
    return {"scales": scales, "skipped": skipped, "losses": losses, "params_finite": finite, "step": opt.step.item()}


def check_accumulate(group, k=3, micro=4):
    """k micro-batches of ``micro`` examples == one step on the k*micro concatenated batch."""
    rank = group.rank()
    model, reference = make(), make()
    opt = distopt.Adamax(0.01, group=group)
    ref_opt = distopt.Adamax(0.01, group=group)
    opt.init(model.trainable_parameters())
    acc = distopt.GradientAccumulator(k)
    sent_during_micro, released = [], []
    for step in range(2):
        x, y = batch(step, rank, size=k * micro)
        for j in range(k):
            sent = opt.comm.traffic.total_sent()
            _, grads = nn.value_and_grad(model, loss_fn)(model, x[j * micro : (j + 1) * micro], y[j * micro : (j + 1) * micro])
            grads = acc.add(grads)
            released.append(grads is not None)
            if grads is None:
                mx.eval(acc.state)
                sent_during_micro.append(opt.comm.traffic.total_sent() - sent)
            else:
                opt.update(model, grads)
                mx.eval(model.parameters(), opt.state)
        _, ref_grads = nn.value_and_grad(reference, loss_fn)(reference, x, y)
        ref_opt.update(reference, ref_grads)
        mx.eval(reference.parameters(), ref_opt.state)
    return {
        "released": released,
        "bytes_sent_before_last": sent_during_micro,
        "params_max_diff": max_diff(model.parameters(), reference.parameters()),
        "state_max_diff": max_diff(opt.state["shards"], ref_opt.state["shards"]),
        "steps": opt.step.item(),
    }


def check_bytes(group):
    """Bytes of one step: bf16 params with master weights vs the same model in fp32."""
    rank, out = group.rank(), {}
    for name, dtype, kwargs in [
        ("fp32", mx.float32, {}),
        ("bf16_master", mx.bfloat16, {"master_weights": True}),
        ("bf16_master_reduce_fp32", mx.bfloat16, {"master_weights": True, "reduce_dtype": mx.float32}),
    ]:
        model = make(dtype, width=64)
        opt = distopt.Adamax(0.01, group=group, **kwargs)
        opt.init(model.trainable_parameters())
        x, y = batch(0, rank, dtype=dtype)
        _, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        opt.comm.traffic.reset()
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        out[name] = dict(opt.comm.traffic.sent)
    return out


def main():
    group = distopt.init()
    which = sys.argv[1].split(",") if len(sys.argv) > 1 else ["bf16", "clip", "skip", "loss_scale", "accumulate", "bytes"]
    checks = {
        "bf16": lambda: [check_bf16(group)],
        "clip": lambda: [check_clip(group, 1), check_clip(group, 2)],
        "skip": lambda: [check_skip(group), check_skip(group, bad_rank=0, value=float("nan"))],
        "loss_scale": lambda: [check_loss_scale(group)],
        "accumulate": lambda: [check_accumulate(group)],
        "bytes": lambda: [check_bytes(group)],
    }
    for name in which:
        for result in checks[name]():
            print("CHECK " + json.dumps({"check": name, "rank": group.rank(), "size": group.size(), **result}), flush=True)


if __name__ == "__main__":
    main()
