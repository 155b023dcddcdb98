"""Rank script for tests/test_checkpoint.py; prints one ``CKPT {json}`` line per check.

    ckpt_ranks.py save=ROOT          train K steps, save ROOT/<opt>, reload here, J more steps
    ckpt_ranks.py resume=ROOT        load ROOT/<opt> (saved at any N), J more steps
    ckpt_ranks.py weighted=ROOT      the same with unequal shards (shard_weights)
    ckpt_ranks.py bad=CASES.json     every bad checkpoint raises CheckpointError, nothing changes

Several commands may follow each other in one launch.

Every resumed run must equal the uninterrupted plain mlx.optimizers run bit for bit.
"""

import functools
import json
import sys
import time

import mlx.core as mx
from mlx.utils import tree_flatten

import distopt
from ckpt_common import J, K, differences, make_model, make_optimizer, reference, train

START = time.perf_counter()
group = distopt.init()
NAMES = ("adamax", "sgd", "master")


def report(**fields):
    print("CKPT " + json.dumps(fields), f"{time.perf_counter() - START:.2f}s", flush=True)


def resume(root, name, bucket_bytes, shard_weights=None):
    model, opt = make_model(seed=7), make_optimizer(name, bucket_bytes=bucket_bytes, shard_weights=shard_weights)
    meta = distopt.load_checkpoint(f"{root}/{name}", model, opt)
    train(model, opt, K, K + J)
    report(check="resume" if shard_weights is None else "weighted", root=root, name=name, meta=meta, step=int(opt.step.item()),
           diff=differences(model, opt, cached_reference(name)))  # fmt: skip


@functools.lru_cache(maxsize=None)
def cached_reference(name):
    return reference(name)


def save(root):
    for name in NAMES:
        model, opt = make_model(), make_optimizer(name)
        train(model, opt, 0, K)
        path = distopt.save_checkpoint(f"{root}/{name}", model, opt, metadata={"name": name, "k": K})
        report(check="saved", name=name, path=str(path))
        resume(root, name, bucket_bytes=200)
    save_error(root)


def save_error(root):
    """Only rank 1 gets unserializable metadata: every rank raises, nothing is written."""
    model, opt = make_model(), make_optimizer("sgd")
    train(model, opt, 0, 1)
    metadata = {"bad": object()} if group.rank() == 1 else {}
    try:
        distopt.save_checkpoint(f"{root}/sgd", model, opt, metadata=metadata)
        error = None
    except distopt.CheckpointError as e:
        error = str(e)
    report(check="save_error", error=error)


def snapshot(model, opt):
    """This rank's own parameters and optimizer state (its shards), copied."""
    flat = tree_flatten([model.parameters(), opt.state])
    mx.eval([v for _, v in flat])
    return {k: mx.array(v) for k, v in flat}


def bad(cases_file):
    """One model and optimizer per configuration, reused: a failed load changes nothing."""
    built = {}
    for case in json.load(open(cases_file)):
        config = (case.get("optimizer", "adamax"), tuple(case.get("betas", ())), case.get("hidden", 13), case.get("extra_param", False))
        if config not in built:
            model = make_model(hidden=config[2])
            if config[3]:
                model.extra = mx.zeros((2,))
            opt = make_optimizer(config[0], bucket_bytes=4096, **({"betas": list(config[1])} if config[1] else {}))
            if built:  # the first (most used) one is trained a step; the others only initialized
                opt.init(model.trainable_parameters())
            else:
                train(model, opt, 0, 1)
            built[config] = (model, opt, snapshot(model, opt))
        model, opt, before = built[config]
        try:
            distopt.load_checkpoint(case["dir"], model, opt)
            error = None
        except distopt.CheckpointError as e:
            error = str(e)
        after = snapshot(model, opt)
        unchanged = before.keys() == after.keys() and all(mx.array_equal(before[k], after[k]).item() for k in sorted(before))
        report(check="bad", case=case["name"], error=error, unchanged=unchanged)


if __name__ == "__main__":
    for command in sys.argv[1:]:
        mode, arg = command.split("=", 1)
        if mode == "save":
            save(arg)
        elif mode == "resume":
            for name in NAMES:
                resume(arg, name, bucket_bytes=1024)
        elif mode == "weighted":  # unequal shards: rank r holds r + 1 parts
            resume(arg, "adamax", bucket_bytes=1024, shard_weights=list(range(1, group.size() + 1)))
        elif mode == "bad":
            bad(arg)
    report(check="done", rank=group.rank(), size=group.size())
