"""Checkpoints: save at N, load at M = 1..4 bit-for-bit, consolidation, crashes, bad input.

Multi-rank checks run on real ranks through ``distopt launch`` (ring and MPI), batched:
one launch saves at N=2 (ring), one resumes at M=3 (MPI) and one at M=4 (ring), each
also loading every bad checkpoint; a fourth (MPI) kills a rank in the middle of a save.
The uninterrupted reference is the plain ``mlx.optimizers`` run (see ckpt_common.py).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers
import msgpack
import pytest
from click.testing import CliRunner
from mlx.utils import tree_map, tree_unflatten

from helpers import SCRIPTS, launcher_env, rank_lines

sys.path.insert(0, str(SCRIPTS))
import ckpt_common as cc  # noqa: E402

import distopt  # noqa: E402
from distopt.cli import main as cli  # noqa: E402
from distopt.manifest import MANIFEST, read_manifest  # noqa: E402

NAMES = ("adamax", "sgd", "master")  # "master": fp32 master shards of the bf16 parameter
PLAIN = ("adamax", "sgd")  # those with an mlx.optimizers twin


def records(out, rank):
    return [json.loads(line[5:].rsplit(" ", 1)[0]) for line in rank_lines(out, rank) if line.startswith("CKPT ")]


def tree_digest(root):
    """sha256 of every file under ``root`` (to prove nothing was written or changed)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """N=2 (ring): K steps, save, reload in the same launch, J more steps."""
    from helpers import run_ranks

    root = tmp_path_factory.mktemp("ckpt") / "n2"
    code, out, err = run_ranks(2, "ckpt_ranks.py", f"save={root}", backend="ring", timeout=90)
    assert code == 0, out + err
    return root, out


@pytest.fixture(scope="module")
def saved_n1(tmp_path_factory):
    """N=1 (this process, the plain-MLX fallback): K steps, save."""
    root = tmp_path_factory.mktemp("ckpt") / "n1"
    for name in NAMES:
        model, opt = cc.make_model(), cc.make_optimizer(name)
        cc.train(model, opt, 0, cc.K)
        distopt.save_checkpoint(root / name, model, opt, metadata={"name": name, "k": cc.K})
    return root


def check_resumed(out, ranks, roots):
    for rank in range(ranks):
        got = [r for r in records(out, rank) if r["check"] == "resume"]
        assert [(r["root"], r["name"]) for r in got] == [(str(root), n) for root in roots for n in NAMES], out
        for r in got:
            assert r["diff"] == [], f"rank {rank} {r['root']} {r['name']} differs from the uninterrupted run: {r['diff']}"
            assert r["step"] == cc.K + cc.J and r["meta"] == {"name": r["name"], "k": cc.K}
        assert records(out, rank)[-1] == {"check": "done", "rank": rank, "size": ranks}


def test_save_n2_and_resume_n2(saved):
    root, out = saved
    check_resumed(out, 2, [root])
    for rank in range(2):
        [failed] = [r for r in records(out, rank) if r["check"] == "save_error"]
        assert failed["error"].startswith("metadata must be msgpack-serializable") and failed["error"].endswith("(rank 1)")
    for name in NAMES:
        m = read_manifest(root / name / "step-00000003")
        assert (m["world_size"], m["num_shards"], m["step"], m["optimizer_step"]) == (2, 2, 3, 3)
        assert sorted(m["files"]) == ["model.safetensors", "optimizer-00000-of-00002.safetensors", "optimizer-00001-of-00002.safetensors"]
        assert (root / name / "latest").read_text() == "step-00000003\n"
        assert sorted(p.name for p in (root / name).iterdir()) == ["latest", "step-00000003"]
        assert not [p for p in (root / name).iterdir() if p.name.startswith(".tmp-")]
    assert read_manifest(root / "adamax" / "step-00000003")["optimizer"] == {
        "class": "Adamax", "hyperparameters": {"betas": [0.8, 0.99], "bias_correction": False, "eps": 1e-6},
        "schedules": ["learning_rate"],
    }  # fmt: skip


@pytest.mark.parametrize("plain", [False, True], ids=["distopt_n1", "mlx_optimizer"])
def test_resume_n1_from_n2(saved, plain):
    root, _ = saved
    for name in PLAIN if plain else NAMES:
        model, opt = cc.make_model(seed=5), cc.make_optimizer(name, plain=plain)
        state = opt.state
        assert distopt.load_checkpoint(root / name, model, opt) == {"name": name, "k": cc.K}
        assert opt.state is state  # filled in place (a compiled step may hold it)
        assert opt.step.item() == cc.K
        cc.train(model, opt, cc.K, cc.K + cc.J)
        assert cc.differences(model, opt, cc.reference(name)) == []


def test_load_under_a_compiled_step(saved, name="master"):
    """load_checkpoint fills the state in place, so a step compiled with inputs=[model.state, opt.state]
    before loading goes on from the checkpoint ("master": the flat path, at N=1)."""
    root, _ = saved
    model, opt = cc.make_model(seed=3), cc.make_optimizer(name)
    opt.init(model.trainable_parameters())
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(t_x, t_y):
        loss_and_grad = nn.value_and_grad(model, lambda m: nn.losses.mse_loss(m(t_x), t_y))
        _, g = loss_and_grad(model)
        opt.update(model, tree_map(cc._round, g))

    step(*cc.batch(0))  # traced before the load
    mx.eval(state)
    distopt.load_checkpoint(root / name, model, opt)
    for t in range(cc.K, cc.K + cc.J):
        step(*cc.batch(t))
        mx.eval(state)
    assert cc.differences(model, opt, cc.reference(name)) == []


def test_consolidate_loads_into_plain_mlx(saved, tmp_path):
    root, _ = saved
    for name in NAMES:
        out = tmp_path / name
        result = CliRunner().invoke(cli, ["ckpt", "consolidate", str(root / name), str(out)])
        assert result.exit_code == 0, result.output
        if name == "master":
            assert sorted(p.name for p in out.iterdir()) == ["master.safetensors", "model.safetensors", "optimizer.safetensors"]
            masters = mx.load(str(out / "master.safetensors"))
            assert list(masters) == ["scale"] and masters["scale"].dtype == mx.float32
            assert not [k for k in mx.load(str(out / "optimizer.safetensors")) if k.endswith(".master")]
            continue
        assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "optimizer.safetensors"]
        model, opt = cc.make_model(seed=9), cc.make_optimizer(name, plain=True)
        model.load_weights(str(out / "model.safetensors"))
        opt.state = tree_unflatten(list(mx.load(str(out / "optimizer.safetensors")).items()))
        cc.train(model, opt, cc.K, cc.K + cc.J)
        assert cc.differences(model, opt, cc.reference(name)) == []
        again = CliRunner().invoke(cli, ["ckpt", "consolidate", str(root / name), str(out)])
        assert again.exit_code != 0 and "exists; consolidate into a new or empty directory" in again.output


def test_inspect(saved):
    root, _ = saved
    result = CliRunner().invoke(cli, ["ckpt", "inspect", str(root / "adamax")])
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"checkpoint  {root / 'adamax' / 'step-00000003'}" in text
    assert "step        3 (optimizer step 3, learning rate 0.05)" in text
    assert "optimizer   Adamax betas=[0.8, 0.99] bias_correction=False eps=1e-06; scheduled: learning_rate" in text
    assert "saved by    2 rank(s) as 2 optimizer shard(s)" in text
    assert "state       float32: 294 elements (padded 294), 3 bucket(s); keys m (float32), v (float32)" in text
    assert "state       bfloat16: 5 elements (padded 6), 1 bucket(s); keys m (bfloat16), v (bfloat16)" in text
    assert text.count("  ok\n") + text.endswith("  ok") == 3
    # A registered subcommand of the installed CLI, run as users run it.
    run = subprocess.run([sys.executable, "-m", "distopt.cli", "ckpt", "inspect", str(root / "sgd")],
                         capture_output=True, text=True, env=launcher_env(), timeout=60)  # fmt: skip
    assert run.returncode == 0 and "optimizer   SGD " in run.stdout, run.stderr


def test_inspect_flags_a_corrupted_file(bad_cases):
    base, _ = bad_cases
    result = CliRunner().invoke(cli, ["ckpt", "inspect", str(base / "altered")])
    assert result.exit_code == 1
    assert "optimizer-00001-of-00002.safetensors does not match its sha256" in result.output
    assert "model.safetensors" in result.output and result.output.count("  ok") == 2


def make_bad_cases(good, base):
    """Copies of the N=2 Adamax checkpoint root, each broken in one way: [(case, expected message)]."""
    cases = []

    def copy(name):
        shutil.copytree(good, base / name)
        return base / name / "step-00000003"

    def rewrite(path, change):
        m = msgpack.unpackb((path / MANIFEST).read_bytes())
        change(m)
        (path / MANIFEST).write_bytes(msgpack.packb(m))

    shard1 = "optimizer-00001-of-00002.safetensors"
    p = copy("truncated")
    data = (p / shard1).read_bytes()
    (p / shard1).write_bytes(data[: len(data) - 7])
    cases.append(({"name": "truncated"}, "is truncated or altered"))
    p = copy("altered")
    data = bytearray((p / shard1).read_bytes())
    data[-3] ^= 0x40
    (p / shard1).write_bytes(bytes(data))
    cases.append(({"name": "altered"}, f"{shard1} does not match its sha256"))
    p = copy("missing")
    (p / "optimizer-00000-of-00002.safetensors").unlink()
    cases.append(({"name": "missing"}, "optimizer-00000-of-00002.safetensors is missing"))
    copy("other_optimizer")
    cases.append(({"name": "other_optimizer", "optimizer": "sgd"}, "The checkpoint holds Adamax state; this optimizer is SGD"))
    copy("hyperparameters")
    cases.append(({"name": "hyperparameters", "betas": [0.9, 0.99]}, "has betas=[0.8, 0.99]; this optimizer has betas=[0.9, 0.99]"))
    copy("shapes")
    cases.append(({"name": "shapes", "hidden": 12}, "Parameter 'layers.0.weight' is [12, 7] float32 in the model but [13, 7] float32"))
    copy("names")
    cases.append(({"name": "names", "extra_param": True}, "The model has parameter 'extra', which the checkpoint lacks"))
    p = copy("escape")
    rewrite(p, lambda m: m["shards"].__setitem__(1, "../" + shard1))
    cases.append(({"name": "escape"}, "is not a plain file name inside the checkpoint directory"))
    p = copy("absurd")
    rewrite(p, lambda m: m["buffers"]["float32"]["entries"][0].__setitem__(1, [2**40, 2**20]))
    cases.append(({"name": "absurd"}, "absurd size"))
    p = copy("absurd_bytes")
    rewrite(p, lambda m: m["files"][shard1].__setitem__("bytes", 2**61))
    cases.append(({"name": "absurd_bytes"}, "the manifest says 2305843009213693952"))
    p = copy("not_msgpack")
    (p / MANIFEST).write_text(json.dumps({"format": "distopt-checkpoint"}))
    cases.append(({"name": "not_msgpack"}, "is not a valid msgpack manifest"))
    p = copy("ext_type")
    (p / MANIFEST).write_bytes(msgpack.packb({"format": msgpack.ExtType(1, b"x")}))
    cases.append(({"name": "ext_type"}, "extension type 1 is not allowed"))
    copy("pointer")
    (base / "pointer" / "latest").write_text("../../etc\n")
    cases.append(({"name": "pointer"}, "which is not a checkpoint directory name"))
    for case, _ in cases:
        case["dir"] = str(base / case["name"])
    return cases


@pytest.fixture(scope="module")
def bad_cases(saved, tmp_path_factory):
    root, _ = saved
    base = tmp_path_factory.mktemp("bad")
    cases = make_bad_cases(root / "adamax", base)
    (base.parent / "cases.json").write_text(json.dumps([c for c, _ in cases]))
    return base, cases


def check_bad(out, ranks, cases):
    for rank in range(ranks):
        got = {r["case"]: r for r in records(out, rank) if r["check"] == "bad"}
        assert sorted(got) == sorted(c["name"] for c, _ in cases), out
        for case, expected in cases:
            r = got[case["name"]]
            assert r["error"] is not None and expected in r["error"], f"rank {rank}, {case['name']}: {r['error']!r}"
            assert r["unchanged"], f"rank {rank}, {case['name']}: the model or optimizer changed"


@pytest.mark.parametrize("ranks,backend", [(3, "mpi"), (4, "ring")])
def test_resume_and_bad_input_on_m_ranks(saved, saved_n1, bad_cases, ranks, backend):
    """M ranks load the N=2 (and N=1) checkpoints exactly, and every bad checkpoint fails on every rank."""
    from helpers import run_ranks

    root, _ = saved
    base, cases = bad_cases
    before = tree_digest(base)
    roots = [root, saved_n1] if backend == "mpi" else [root]  # N=1 -> M once, to save time
    args = [f"resume={r}" for r in roots] + [f"weighted={root}", f"bad={base.parent / 'cases.json'}"]
    code, out, err = run_ranks(ranks, "ckpt_ranks.py", *args, backend=backend, timeout=90)
    assert code == 0, out + err
    check_resumed(out, ranks, roots)
    for rank in range(ranks):
        [weighted] = [r for r in records(out, rank) if r["check"] == "weighted"]
        assert weighted["diff"] == [] and weighted["step"] == cc.K + cc.J, weighted
    check_bad(out, ranks, cases)
    assert tree_digest(base) == before


def test_bad_input_single_process(saved, bad_cases):
    """The same bad checkpoints at N=1, where the optimizer keeps the mlx.optimizers layout."""
    base, cases = bad_cases
    for case, expected in cases:
        model = cc.make_model(hidden=case.get("hidden", 13))
        if case.get("extra_param"):
            model.extra = mx.zeros((2,))
        extra = {"betas": case["betas"]} if "betas" in case else {}
        opt = cc.make_optimizer(case.get("optimizer", "adamax"), **extra)
        with pytest.raises(distopt.CheckpointError, match=None) as info:
            distopt.load_checkpoint(case["dir"], model, opt)
        assert expected in str(info.value), (case["name"], str(info.value))
        assert opt.state.keys() == {"step", "learning_rate"} and opt.step.item() == 0


def test_master_checkpoint_needs_master_weights(saved):
    """fp32 master shards cannot silently vanish: loading them without master_weights is an error."""
    root, _ = saved
    for opt in (distopt.Adamax(learning_rate=0.01), mlx.optimizers.Adamax(learning_rate=0.01)):
        model = cc.make_model()
        opt.init(model.trainable_parameters())
        with pytest.raises(distopt.CheckpointError, match=r"bfloat16 optimizer state has keys \['m', 'master', 'v'\]; this optimizer keeps \['m', 'v'\]"):
            distopt.load_checkpoint(root / "master", model, opt)


def test_manifest_parser_refuses_hostile_input(tmp_path):
    """The manifest is untrusted: deep nesting, wrong types, missing fields, huge files all fail clearly."""
    cases = [
        (msgpack.packb([1, 2]), "the manifest must be a dict, got list"),
        (msgpack.packb({"format": "distopt-checkpoint", "version": 1}), "the field 'num_shards' is missing"),
        (msgpack.packb({"format": "distopt-checkpoint", "version": 2}), "version 2 is not supported"),
        (b"\x91" * 100_000, "is not a valid msgpack manifest (StackError"),
        (msgpack.packb({"a": 1}) + b"junk", "trailing bytes after the manifest"),
        (b"\x80\x81", "is not a valid msgpack manifest"),
    ]
    for data, expected in cases:
        (tmp_path / MANIFEST).write_bytes(data)
        with pytest.raises(distopt.CheckpointError) as info:
            read_manifest(tmp_path)
        assert expected in str(info.value), str(info.value)
    with open(tmp_path / MANIFEST, "wb") as f:
        f.truncate(65 * 1024**2)  # sparse: refused by its size before it is read
    with pytest.raises(distopt.CheckpointError, match="more than the 67108864 a manifest may have"):
        read_manifest(tmp_path)


def run_crash_script(root, crash=None, keep_last=None):
    env = launcher_env({"DISTOPT_CKPT_CRASH": crash or ""})
    args = [sys.executable, str(SCRIPTS / "ckpt_crash.py"), str(root)] + ([str(keep_last)] if keep_last else [])
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, cwd=SCRIPTS)


def latest_step(root):
    model, opt = cc.make_model(), cc.make_optimizer("adamax", plain=True)
    distopt.load_checkpoint(root, model, opt)
    return int(opt.step.item())


def test_crash_at_any_point_keeps_a_loadable_checkpoint(tmp_path):
    """A process dies at each point of a save (os._exit, as in a power cut); the last checkpoint loads."""
    root = tmp_path / "run"
    assert run_crash_script(root).returncode == 0
    assert latest_step(root) == 1
    for point in ("shard", "manifest"):
        done = run_crash_script(root, crash=point)
        assert done.returncode == 17, done.stderr
        assert latest_step(root) == 1
        assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-step-00000002")], "the interrupted save left no temporary directory"
    done = run_crash_script(root, crash="rename")  # renamed, but `latest` not yet moved
    assert done.returncode == 17 and latest_step(root) == 1 and (root / "step-00000002" / MANIFEST).exists()
    done = run_crash_script(root, crash="latest")  # step 2 again: step-00000002.1, and `latest` moved
    assert done.returncode == 17 and latest_step(root) == 2 and (root / "latest").read_text() == "step-00000002.1\n"
    done = run_crash_script(root, keep_last=2)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002.1", "step-00000003"]
    assert latest_step(root) == 3


def test_rank_killed_mid_save_mpi(tmp_path):
    """Rank 1 dies right after writing its shard: the job fails, the previous checkpoint still loads."""
    from helpers import run_ranks

    root = tmp_path / "run"
    model, opt = cc.make_model(), cc.make_optimizer("adamax")
    cc.train(model, opt, 0, 1)
    distopt.save_checkpoint(root, model, opt)  # saved by one process, resumed by two
    before = tree_digest(root)
    code, out, err = run_ranks(2, "ckpt_crash.py", root, backend="mpi", timeout=60, env={"DISTOPT_CKPT_CRASH": "shard:1"})
    assert code != 0
    assert "SAVED" not in out
    leftovers = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers and (leftovers[0] / "optimizer-00001-of-00002.safetensors").exists()
    assert {k: v for k, v in tree_digest(root).items() if not k.startswith(".tmp-")} == before
    assert latest_step(root) == 1


def test_save_needs_a_directory_every_rank_sees(tmp_path):
    """Rank 1 in its own mount namespace (a private tmpfs at ROOT), as two Macs without a shared volume."""
    from helpers import run_ranks

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and util-linux unshare to give one rank a private directory")
    root = tmp_path / "root"
    code, out, err = run_ranks(2, "ckpt_private.py", root, backend="ring", timeout=60)
    assert code == 0, out + err
    for rank in range(2):
        lines = rank_lines(out, rank)
        assert f"CKPT error {root}/.tmp-step-00000001-" in lines[0], out
        assert "is not visible on rank 1: the checkpoint directory must be on a filesystem that every rank sees" in lines[0]
    assert rank_lines(out, 0)[1] == "CKPT listing " and os.listdir(root) == []


def test_save_rejects_bad_arguments(tmp_path):
    model, opt = cc.make_model(), cc.make_optimizer("adamax")
    cc.train(model, opt, 0, 1)
    bad = [
        (dict(keep_last=0), "keep_last must be a positive integer"),
        (dict(metadata={"x": object()}), "metadata must be msgpack-serializable"),
        (dict(metadata=[1]), "metadata must be a dict"),
        (dict(step=-1), "step must be a non-negative integer"),
        (dict(step=1.5), "step must be a non-negative integer"),
        (dict(metadata={1: "int key"}), "metadata must be msgpack-serializable"),
    ]
    for kwargs, expected in bad:
        with pytest.raises(distopt.CheckpointError, match=expected):
            distopt.save_checkpoint(tmp_path / "root", model, opt, **kwargs)
    assert not (tmp_path / "root").exists()
    path = distopt.save_checkpoint(tmp_path / "root", model, opt, step=mx.array(10))
    with pytest.raises(distopt.CheckpointError, match="is a checkpoint itself"):
        distopt.save_checkpoint(path, model, opt)
    assert sorted(os.listdir(tmp_path / "root")) == ["latest", "step-00000010"]
