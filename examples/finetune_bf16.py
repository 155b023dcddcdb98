"""Fine-tune a model loaded from safetensors in bfloat16, with fp32 master shards.

    python examples/charlm.py --checkpoint-dir ck                 # pretrain (or use any CharLM weights)
    distopt launch -n 2 examples/finetune_bf16.py --weights ck

The model (examples/charlm.py's CharLM; sizes read from the file) is loaded from a
safetensors file and cast to bfloat16, so parameters, activations and gradients take
half the memory. ``distopt.Adamax(..., master_weights=True)`` keeps, on each rank, an
fp32 copy of its 1/N shard of the weights and the fp32 optimizer state of that shard:
updates too small for bf16 accumulate in fp32 instead of being rounded away, and each
rank holds 1/N of the (4 + 8) bytes per parameter they cost. The text fine-tuned on is
Macbeth, the second play of examples/data/shakespeare.txt.

Without ``--weights``, a freshly initialised model is written to ``base.safetensors``
(in ``--checkpoint-dir``, or a temporary folder) and loaded from there, so the example
runs on its own.
"""

import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

import distopt
from charlm import CharLM, batch, generate, load_corpus
from common import global_mean, local_rows, parser, progress_for, resume, save, setup


def weights_file(path):
    """``path`` itself, or the model file of a distopt checkpoint (root or ``step-N`` folder)."""
    path = Path(path)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    return path / "model.safetensors" if path.is_dir() else path


def load_model(path, heads):
    """A CharLM with the sizes and weights of the safetensors file ``path``."""
    weights = mx.load(str(path))
    vocab, dims = weights["embedding.weight"].shape
    context = weights["position.weight"].shape[0]
    layers = len({key.split(".")[1] for key in weights if key.startswith("blocks.")})
    model = CharLM(vocab, context, dims, heads, layers)
    model.load_weights(list(weights.items()), strict=True)
    return model


def base_weights(args, group):
    """Path of a fresh CharLM's weights, written by rank 0 (every rank builds the same one)."""
    folder = args.checkpoint_dir or Path(tempfile.gettempdir()) / "distopt-finetune-example"
    path = Path(folder) / "base.safetensors"
    if group.rank() == 0 and not path.exists():
        mx.random.seed(args.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.safetensors")
        CharLM(69, 64, 128, args.heads, 2).save_weights(str(tmp))
        tmp.replace(path)
    global_mean(mx.array(0.0), group).item()  # a barrier: the file exists for every rank after it
    return path


def loss_fn(model, inputs, targets):
    logits = model(inputs).astype(mx.float32)  # the softmax in fp32; the model runs in bf16
    return nn.losses.cross_entropy(logits, targets, reduction="mean")


def main():
    p = parser(__doc__.split("\n")[0], steps=200, batch_size=32, lr=5e-4)
    p.add_argument("--weights", type=Path, default=None, help="a CharLM's safetensors file, or a checkpoint folder of examples/charlm.py (default: a fresh model)")
    p.add_argument("--heads", type=int, default=4, help="attention heads of the saved model (default 4)")
    p.add_argument("--max-norm", type=float, default=1.0, help="clip the global gradient norm (default 1.0)")
    p.add_argument("--sample", type=int, default=200, help="characters to generate at the end (default 200)")
    args = p.parse_args()
    group, _ = setup(args)

    weights = weights_file(args.weights) if args.weights else base_weights(args, group)
    model = load_model(weights, args.heads)
    model.set_dtype(mx.bfloat16)
    ids, vocab = load_corpus()
    if len(vocab) != model.embedding.weight.shape[0]:
        raise SystemExit(f"{weights} has a vocabulary of {model.embedding.weight.shape[0]}, the corpus {len(vocab)}.")
    text = ids[_macbeth_start():]
    context = model.position.weight.shape[0]
    optimizer = distopt.Adamax(learning_rate=args.lr, master_weights=True, max_norm=args.max_norm)
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    start = resume(args, model, optimizer)
    progress = progress_for(args, group, optimizer, start)
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    progress.log(
        f"fine-tuning {weights} ({n / 1e6:.2f}M parameters, bf16) on Macbeth, {group.size()} rank(s), "
        f"global batch {args.batch_size}x{context}; fp32 master shards of {n // group.size():,} parameters per rank"
    )
    for step in range(start + 1, args.steps + 1):
        inputs, targets = batch(text, step, args.batch_size, context, args.seed)
        loss, grads = loss_and_grad(model, local_rows(inputs, group), local_rows(targets, group))
        optimizer.update(model, grads)
        loss = global_mean(loss, group)
        mx.eval(loss, model.parameters(), optimizer.state)
        progress.update(step, loss.item(), tokens=args.batch_size * context, grad_norm=optimizer.last_grad_norm)
        if args.checkpoint_dir and args.save_every and step % args.save_every == 0:
            save(args.checkpoint_dir, step, model, optimizer)
    progress.close()
    if args.checkpoint_dir and args.steps > start and not (args.save_every and args.steps % args.save_every == 0):
        save(args.checkpoint_dir, args.steps, model, optimizer)
    if args.sample:
        progress.log("sample:\n" + generate(model, vocab, "MACBETH.\n", args.sample, seed=args.seed))


def _macbeth_start():
    """Character offset of Macbeth in the corpus."""
    from charlm import CORPUS

    return CORPUS.read_text(encoding="ascii").index("\nMACBETH\n")


if __name__ == "__main__":
    main()
