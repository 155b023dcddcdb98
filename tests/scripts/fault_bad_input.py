"""Rank script: feed distopt bad input, case after case, in one multi-rank job.

    fault_bad_input.py all           # every case below, on every rank; prints "CASE -> Error: message"
    fault_bad_input.py rank1_grads   # only rank 1 passes a gradient of the wrong shape (it must exit)

Every case of ``all`` raises the same error on every rank before any collective that
could hang (or after one all ranks join), so the job goes on to the next case.
"""

import sys

import mlx.core as mx
import mlx.nn as nn

import distopt


def model(width=8):
    mx.random.seed(0)
    m = nn.Linear(4, width)
    mx.eval(m.parameters())
    return m


def grads_of(m):
    return {k: mx.ones_like(v) for k, v in m.parameters().items()}


def differing_shapes(rank):
    m = model(8 if rank == 0 else 6)
    distopt.SGD(learning_rate=0.1).update(m, grads_of(m))


def differing_settings(rank):
    m = model()
    distopt.Adamax(learning_rate=0.1, betas=[0.9, 0.999 if rank == 0 else 0.99]).update(m, grads_of(m))


def differing_overlap(rank):  # the ranks would reduce their buckets in different orders
    m = model()
    distopt.SGD(learning_rate=0.1, overlap_backward=rank == 0).update(m, grads_of(m))


def empty_model(rank):
    distopt.SGD(learning_rate=0.1).update(nn.Sequential(), {})


def grads_missing(rank):  # a later step lacks a gradient the first one had
    m = model()
    opt = distopt.SGD(learning_rate=0.1)
    opt.update(m, grads_of(m))
    opt.update(m, {"weight": mx.ones_like(m.weight)})


def grads_wrong_shape(rank):
    m = model()
    distopt.SGD(learning_rate=0.1).update(m, {"weight": mx.ones((2, 2)), "bias": mx.ones_like(m.bias)})


def grads_wrong_dtype(rank):  # first step: checked against the parameters
    m = model()
    grads = {"weight": mx.ones_like(m.weight).astype(mx.float16), "bias": mx.ones_like(m.bias)}
    distopt.SGD(learning_rate=0.1).update(m, grads)


def grads_wrong_dtype_later(rank):  # later step: checked against the optimizer's layout
    m = model()
    opt = distopt.SGD(learning_rate=0.1)
    opt.update(m, grads_of(m))
    opt.update(m, {"weight": mx.ones_like(m.weight).astype(mx.bfloat16), "bias": mx.ones_like(m.bias)})


def lr_nan(rank):
    distopt.SGD(learning_rate=float("nan"))


def lr_negative(rank):
    distopt.Adagrad(learning_rate=-0.1)


def lr_nan_set_later(rank):
    m = model()
    opt = distopt.SGD(learning_rate=0.1)
    opt.update(m, grads_of(m))
    opt.learning_rate = float("nan")
    opt.update(m, grads_of(m))


CASES = [differing_shapes, differing_settings, differing_overlap, empty_model, grads_missing, grads_wrong_shape,
         grads_wrong_dtype, grads_wrong_dtype_later, lr_nan, lr_negative, lr_nan_set_later]


def main():
    group = distopt.init()
    rank = group.rank()
    if sys.argv[1] == "rank1_grads":
        m = model()
        opt = distopt.SGD(learning_rate=0.1)
        opt.update(m, grads_of(m))
        mx.eval(m.parameters())
        grads = grads_of(m)
        if rank == 1:
            grads["bias"] = mx.ones((3,))
        opt.update(m, grads)
        mx.eval(m.parameters())
        print("no error", flush=True)
        return
    for case in CASES:
        try:
            case(rank)
            print(f"{case.__name__} -> no error", flush=True)
        except Exception as e:  # the point: which error, with which message
            print(f"{case.__name__} -> {type(e).__name__}: {e}", flush=True)
        check = mx.distributed.all_sum(mx.array(1), group=group).item()  # the ranks are still in step
        assert check == group.size()
    print("all cases done", flush=True)


if __name__ == "__main__":
    main()
