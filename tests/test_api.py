"""Single-process behaviour: the MLX optimizer interface, validation, layout, N=1 fallback."""

import inspect
import subprocess
import sys
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten

import distopt
from distopt.layout import FlatLayout, dtype_name, split_counts

PAIRS = [(optim.SGD, distopt.SGD), (optim.Adagrad, distopt.Adagrad), (optim.Adamax, distopt.Adamax)]


@pytest.mark.parametrize("mlx_cls,distopt_cls", PAIRS)
def test_constructor_arguments_and_defaults_match_mlx(mlx_cls, distopt_cls):
    ours = inspect.signature(distopt_cls.__init__).parameters
    theirs = inspect.signature(mlx_cls.__init__).parameters
    positional = [p for p in ours.values() if p.kind != p.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in positional] == [(p.name, p.default) for p in theirs.values()]
    assert [p.name for p in ours.values() if p.kind == p.KEYWORD_ONLY] == [
        "group", "stage", "bucket_bytes", "shard_weights",
        "master_weights", "reduce_dtype", "max_norm", "skip_nonfinite", "loss_scale",
        "cache_step_buffers", "overlap_backward",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "make",
    [
        lambda m: m.SGD(0.1, nesterov=True),
        lambda m: m.SGD(0.1, momentum=0.9, dampening=0.1, nesterov=True),
        lambda m: m.Adagrad(0.1, eps=0.0),
        lambda m: m.Adamax(0.1, betas=[1.0, 0.9]),
        lambda m: m.Adamax(0.1, eps=-1.0),
    ],
)
def test_validation_errors_are_mlx_errors(make):
    with pytest.raises(ValueError) as theirs:
        make(optim)
    with pytest.raises(ValueError) as ours:
        make(distopt)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("inner", [optim.Adafactor(), optim.Muon(0.01)])
def test_non_elementwise_optimizers_are_refused(inner):
    with pytest.raises(TypeError, match="is not element-wise"):
        distopt.ShardedOptimizer(inner)


def test_bad_stage_is_refused():
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        distopt.Adamax(0.1, stage=3)


def test_bad_backend_name_is_refused():
    with pytest.raises(ValueError, match="Unknown backend 'tcp'"):
        distopt.init(backend="tcp")


def _model():
    mx.random.seed(3)
    return nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 2))


def _grads(model, seed):
    mx.random.seed(seed)
    x, y = mx.random.normal((4, 5)), mx.random.normal((4, 2))
    return nn.value_and_grad(model, lambda m: nn.losses.mse_loss(m(x), y))(model)[1]


@pytest.mark.parametrize("mlx_cls,distopt_cls", PAIRS)
def test_single_process_is_plain_mlx(mlx_cls, distopt_cls):
    schedule = optim.cosine_decay(0.1, 10)
    ours, theirs = distopt_cls(schedule), mlx_cls(schedule)
    a, b = _model(), _model()
    assert isinstance(ours, optim.Optimizer)
    for step in range(5):
        ours.update(a, _grads(a, step))
        theirs.update(b, _grads(b, step))
        mx.eval(a.parameters(), b.parameters(), ours.state, theirs.state)
    for (ka, va), (kb, vb) in zip(tree_flatten(a.parameters()), tree_flatten(b.parameters())):
        assert ka == kb and mx.array_equal(va, vb).item()
    assert tree_flatten(ours.state, destination={}).keys() == tree_flatten(theirs.state, destination={}).keys()
    assert ours.step.item() == 5 and ours.learning_rate.item() == theirs.learning_rate.item()
    assert ours.consolidated_state() is ours.state
    report = ours.memory_report()
    assert report["optimizer_state_bytes"] == report["optimizer_state_bytes_unsharded"] > 0


def test_learning_rate_setter_and_explicit_init():
    opt = distopt.SGD(0.1, momentum=0.9)
    model = _model()
    opt.init(model.trainable_parameters())
    assert mx.array_equal(opt.state["layers"][0]["weight"]["v"], mx.zeros((9, 5))).item()
    opt.learning_rate = 0.5
    assert opt.learning_rate.item() == 0.5


def test_single_process_step_compiles_like_mlx_lm():
    model, opt = _model(), distopt.Adamax(0.01)
    reference, ref_opt = _model(), optim.Adamax(0.01)
    mx.random.seed(0)
    x, y = mx.random.normal((4, 5)), mx.random.normal((4, 2))

    def make_step(m, o):
        @partial(mx.compile, inputs=[m.state, o.state], outputs=[m.state, o.state])
        def step(x, y):
            loss, grads = nn.value_and_grad(m, lambda mm: nn.losses.mse_loss(mm(x), y))(m)
            o.update(m, grads)
            return loss

        return step

    step, ref_step = make_step(model, opt), make_step(reference, ref_opt)
    for _ in range(3):
        mx.eval(step(x, y), ref_step(x, y))
    for (_, va), (_, vb) in zip(tree_flatten(model.parameters()), tree_flatten(reference.parameters())):
        assert mx.array_equal(va, vb).item()


# ---- layout ---------------------------------------------------------------


def test_split_counts_equal_and_weighted():
    assert split_counts(12, [1, 1, 1]) == (4, 4, 4)
    assert split_counts(10, [1, 1, 2]) == (3, 2, 5)
    assert sum(split_counts(1001, [16, 32, 64, 96])) == 1001


def _tree():
    return {
        "a": mx.arange(7, dtype=mx.float32).reshape(7, 1),
        "b": [mx.arange(5, dtype=mx.float32) + 100, mx.arange(3, dtype=mx.bfloat16)],
        "c": mx.array(9.0),
    }


@pytest.mark.parametrize("n,bucket_bytes", [(1, 1 << 20), (2, 8), (3, 16), (4, 1 << 20), (5, 12)])
def test_layout_shards_cover_the_buffer_once(n, bucket_bytes):
    tree = _tree()
    layout = FlatLayout(tree, n, bucket_bytes=bucket_bytes)
    f32 = layout.buffers["float32"]
    assert f32.size == 13 and f32.padded_size % n == 0 and f32.padded_size - f32.size < n
    assert all((b.stop - b.start) % n == 0 for b in f32.buckets)
    shards = [mx.concatenate(layout.shard_parts(tree, "float32", r)) for r in range(n)]
    assert len({s.size for s in shards}) == 1  # equal shards
    full = {name: mx.zeros((buf.padded_size,), buf.dtype) for name, buf in layout.buffers.items()}
    for name, buf in layout.buffers.items():
        pieces = [None] * len(buf.buckets)
        for i, bucket in enumerate(buf.buckets):
            pieces[i] = layout.flat_range(tree, name, bucket.start, bucket.stop)
        full[name] = mx.concatenate(pieces)
        # The padding is zero and sits at the end only.
        assert mx.array_equal(full[name][buf.size :], mx.zeros((buf.padded_size - buf.size,), buf.dtype)).item()
    rebuilt = layout.unflatten(full)
    for (ka, va), (kb, vb) in zip(tree_flatten(tree), tree_flatten(rebuilt)):
        assert ka == kb and va.dtype == vb.dtype and mx.array_equal(va, vb).item()


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("bucket_bytes", [4, 12, 36, 1 << 20])
def test_flat_range_of_transposed_and_3d_leaves(bucket_bytes, blocked, monkeypatch):
    """Leaves that flatten to a copy (a transposed gradient, as nn.Linear's) or span
    buckets give the same flat values as flattening them whole; also when a large
    transposed leaf is copied through column blocks (here made small: blocks of 2
    columns from 8 elements on)."""
    from distopt import layout as layout_module

    if blocked:
        monkeypatch.setattr(layout_module, "TRANSPOSE_BLOCK", 2)
        monkeypatch.setattr(layout_module, "BLOCKED_MIN_ELEMS", 8)
    tree = {"t": mx.arange(35, dtype=mx.float32).reshape(5, 7).T, "c": mx.arange(60, dtype=mx.float32).reshape(3, 4, 5) + 100}
    assert layout_module._transposed_and_large(tree["t"]) is blocked
    assert not layout_module._transposed_and_large(mx.contiguous(tree["t"]))
    layout = FlatLayout(tree, 3, bucket_bytes=bucket_bytes)
    buf = layout.buffers["float32"]
    expected = mx.concatenate([tree["t"].reshape(-1), tree["c"].reshape(-1), mx.zeros((buf.padded_size - buf.size,))])
    for lo in range(buf.padded_size + 1):
        for hi in range(lo + 1, buf.padded_size + 1, 7):
            assert mx.array_equal(layout.flat_range(tree, "float32", lo, hi), expected[lo:hi]).item(), (lo, hi)
    parts = [mx.concatenate(layout.shard_parts(tree, "float32", r)) for r in range(3)]
    assert mx.array_equal(mx.sort(mx.concatenate(parts)), mx.sort(expected)).item()


def test_layout_buffer_smaller_than_world():
    layout = FlatLayout({"w": mx.array([1.0, 2.0])}, 4)
    assert [mx.concatenate(layout.shard_parts({"w": mx.array([1.0, 2.0])}, "float32", r)).tolist() for r in range(4)] == [[1.0], [2.0], [0.0], [0.0]]


def test_layout_weights_give_proportional_shards():
    tree = {"w": mx.zeros((1000,))}
    layout = FlatLayout(tree, 2, weights=[1, 3])
    assert [layout.buffers["float32"].shard_size(r) for r in range(2)] == [250, 750]
    with pytest.raises(ValueError, match="weights must be 2 positive numbers"):
        FlatLayout(tree, 2, weights=[1, 0])


def test_layout_rejects_empty_model_and_mismatched_gradients():
    with pytest.raises(ValueError, match="parameter tree is empty"):
        FlatLayout({}, 2)
    layout = FlatLayout({"w": mx.zeros((3,)), "b": mx.zeros((2,))}, 2)
    with pytest.raises(ValueError, match="miss the parameter 'w'"):
        layout.check_tree({"b": mx.zeros((2,))})
    with pytest.raises(ValueError, match=r"'b' have shape \(3,\) and dtype float32; the optimizer expects \(2,\) and float32"):
        layout.check_tree({"w": mx.zeros((3,)), "b": mx.zeros((3,))})
    with pytest.raises(ValueError, match="dtype bfloat16"):
        layout.check_tree({"w": mx.zeros((3,), mx.bfloat16), "b": mx.zeros((2,))})


def test_api_docs_match_the_docstrings():
    """docs/api.md is generated from the public docstrings and CLI help; it must be current."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "docs" / "gen_api.py"), "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"docs/api.md is out of date: run python docs/gen_api.py\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("bucket_bytes", [12, 40, 1 << 20])
def test_unflatten_buckets_rebuilds_each_parameter_where_it_ends(bucket_bytes):
    """Parameters cut out of the full buckets equal the originals (empty ones too), each
    yielded with the bucket holding its last element."""
    tree = {"a": mx.arange(5.0), "empty": mx.zeros((0,)), "w": mx.arange(21.0).reshape(7, 3), "b": mx.array([7.0, 8.0])}
    layout = FlatLayout(tree, 3, bucket_bytes=bucket_bytes)
    buf = layout.buffers["float32"]
    full = [layout.flat_range(tree, "float32", b.start, b.stop) for b in buf.buckets]
    seen = {}
    for bucket, ready in zip(buf.buckets, layout.unflatten_buckets("float32", iter(full))):
        for path, value in ready:
            entry = next(e for e in buf.entries if e.path == path)
            assert bucket.start <= entry.offset + entry.size <= bucket.stop, path
            seen[path] = value
    assert list(seen) == ["a", "empty", "w", "b"]
    for path, value in seen.items():
        assert value.shape == tree[path].shape and mx.array_equal(value, tree[path]), path


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("bucket_bytes", [4, 12, 36, 88, 160, 1 << 20])
def test_part_segments_in_wire_order_hold_each_part(bucket_bytes, world):
    """Every part of every bucket, from its wire-order segments: the same elements as the
    flat part, and ColumnBlock.row_major puts a block's wire-order values back in row order.
    A transposed leaf (nn.Linear's gradient) gives ColumnBlocks for its whole rows only."""
    import numpy as np

    from distopt.layout import ColumnBlock

    tree = {"t": mx.arange(35, dtype=mx.float32).reshape(5, 7).T, "b": mx.arange(3.0) + 50, "c": mx.arange(24.0).reshape(4, 6) + 100}
    layout = FlatLayout(tree, world, bucket_bytes=bucket_bytes)
    buf, blocks = layout.buffers["float32"], 0
    for bucket in buf.buckets:
        parts = layout.part_segments(tree, "float32", bucket)
        assert len(parts) == world
        for k, segments in enumerate(parts):
            expected = layout.flat_range(tree, "float32", *bucket.part(k))
            wire = [np.asarray(s.wire()).reshape(-1) if isinstance(s, ColumnBlock) else np.asarray(s) for s in segments]
            assert sum(w.size for w in wire) == expected.size
            rebuilt, pos = [], 0
            for s, w in zip(segments, wire):
                if isinstance(s, ColumnBlock):
                    blocks += 1
                    assert s.rows.shape[1] == 5  # rows of the transposed leaf only
                    rebuilt.append(s.row_major(mx.array(w)))
                else:
                    rebuilt.append(mx.array(w))
                pos += w.size
            if rebuilt:
                assert mx.array_equal(mx.concatenate(rebuilt), expected).item(), (bucket, k)
    assert blocks > 0 or bucket_bytes < 88  # smaller buckets hold no whole row of 5


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("bucket_bytes", [4, 12, 36, 1 << 20])
def test_new_leaves_filled_bucket_by_bucket_equal_the_parameters(bucket_bytes, dtype):
    """A gather writing each bucket into NewLeaves.views (as the tcp path does) gives the
    same parameters, each finished with the bucket holding its last element; padding
    goes to scratch, never into a parameter."""
    import numpy as np

    from distopt.buffers import numpy_view

    tree = {"a": mx.arange(5.0), "empty": mx.zeros((0,)), "w": mx.arange(21.0).reshape(7, 3), "b": mx.array([7.0, 8.0])}
    tree = {k: v.astype(dtype) for k, v in tree.items()}
    layout = FlatLayout(tree, 3, bucket_bytes=bucket_bytes)
    buf = layout.buffers[dtype_name(dtype)]
    leaves, seen = layout.new_leaves(buf.name), {}
    for bucket in buf.buckets:
        flat = numpy_view(layout.flat_range(tree, buf.name, bucket.start, bucket.stop))
        views = leaves.views(bucket)
        assert sum(v.size for v in views) == bucket.stop - bucket.start
        np.concatenate(views)  # one dtype: the words a socket moves
        pos = 0
        for view in views:
            view[...] = flat[pos : pos + view.size]
            pos += view.size
        for path, value in leaves.finished(bucket):
            entry = next(e for e in buf.entries if e.path == path)
            assert bucket.start <= entry.offset + entry.size <= bucket.stop, path
            seen[path] = value
    assert list(seen) == ["a", "empty", "w", "b"] and not leaves.open
    for path, value in seen.items():
        assert value.shape == tree[path].shape and value.dtype == dtype and mx.array_equal(value, tree[path]), path


def test_tcp_send_all_resumes_partial_sends_across_views():
    """sendmsg may send part of its buffers; _send_all resumes mid-view, keeps the order,
    skips empty views, and gathers at most 1024 views per call."""
    import numpy as np

    from distopt.byte_ring import _byte_views
    from distopt.tcp import _send_all

    class Trickle:
        def __init__(self):
            self.got, self.calls = bytearray(), 0

        def sendmsg(self, buffers):
            assert len(buffers) <= 1024
            self.calls += 1
            data = b"".join(bytes(b) for b in buffers)[: 5 + self.calls % 7]
            self.got += data
            return len(data)

    memory = np.arange(3000 * 4, dtype=np.float32).reshape(3000, 4)  # a leaf's memory, column by column
    block = memory[:, :3]  # the wire view of 3 of its rows: each column contiguous, not the whole
    views = _byte_views(block) + [memoryview(b"")] + _byte_views(np.arange(5, dtype=np.float32))
    assert len(views) == 3000 + 2
    sock = Trickle()
    _send_all(sock, views, 1)
    assert bytes(sock.got) == np.ascontiguousarray(block).tobytes() + np.arange(5, dtype=np.float32).tobytes()
