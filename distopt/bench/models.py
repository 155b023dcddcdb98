"""The benchmark's models, the same in MLX and PyTorch: a square MLP and a small transformer.

``mlp``: ``MLP_DEPTH`` square ``Linear`` layers of width ``sqrt(P / 4)``, MSE loss.
``transformer``: token embedding, ``TransformerEncoderLayer`` blocks under a causal mask,
a final ``LayerNorm`` and an output projection (vocabulary ``VOCAB``), cross-entropy loss.
"""

import math
import re

METHODS = ("single", "mlx_dp", "distopt_s1", "distopt_s2", "torch_zero")
MLX_DIST_METHODS = ("mlx_dp", "distopt_s1", "distopt_s2")
MODELS = ("mlp", "transformer")
MLP_DEPTH = 4
VOCAB = 2048
# (model dims, layers) of the transformer for a target parameter count.
TRANSFORMER_SHAPES = ((2e6, 128, 4), (2e7, 320, 8), (3e8, 768, 14), (math.inf, 2048, 20))


def parse_size(text):
    """``"1M"`` -> 1_000_000; accepts k, M, B suffixes and plain integers."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMbBgG]?)\s*", str(text))
    if not m:
        raise ValueError(f"Bad model size {text!r}: use a number with k, M or B, e.g. 10M.")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def mlp_width(params):
    """Width of a depth-4 square MLP with about ``params`` parameters (multiple of 32)."""
    return max(32, int(round(math.sqrt(params / MLP_DEPTH) / 32)) * 32)


def transformer_shape(params):
    """(dims, layers, heads) of the transformer for about ``params`` parameters."""
    for limit, dims, layers in TRANSFORMER_SHAPES:
        if params < limit:
            break
    # scale the width so that 12 * layers * dims^2 + 2 * VOCAB * dims ~ params
    dims = max(64, int(round(math.sqrt(max(params - 2 * VOCAB * dims, 12 * 64 * 64) / (12 * layers)) / 64)) * 64)
    return dims, layers, max(1, dims // 64)


def mlx_model(kind, params, cfg):
    """An MLX model, its loss function and one batch of this rank's data."""
    import mlx.core as mx
    import mlx.nn as nn

    mx.random.seed(0)  # same initial weights on every rank
    if kind == "mlp":
        width = mlp_width(params)
        model = _mlx_mlp(width)
        key = mx.random.key(1000 + cfg["rank"])
        x = mx.random.normal((cfg["batch"], width), key=key)
        y = mx.random.normal((cfg["batch"], width), key=mx.random.split(key)[0])

        def loss_fn(model, x, y):
            return nn.losses.mse_loss(model(x), y)

    else:
        dims, layers, heads = transformer_shape(params)
        model = _mlx_transformer(dims, layers, heads)
        key = mx.random.key(1000 + cfg["rank"])
        x = mx.random.randint(0, VOCAB, (cfg["lm_batch"], cfg["seq"]), key=key)
        y = mx.random.randint(0, VOCAB, (cfg["lm_batch"], cfg["seq"]), key=mx.random.split(key)[0])

        def loss_fn(model, x, y):
            return nn.losses.cross_entropy(model(x), y, reduction="mean")

    mx.eval(model.parameters(), x, y)
    return model, loss_fn, (x, y)


def _mlx_mlp(width):
    import mlx.nn as nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(width, width) for _ in range(MLP_DEPTH)]

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = nn.relu(layer(x))
            return self.layers[-1](x)

    return MLP()


def _mlx_transformer(dims, layers, heads):
    import mlx.nn as nn

    class TinyGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, dims)
            self.blocks = [nn.TransformerEncoderLayer(dims, heads, 4 * dims) for _ in range(layers)]
            self.norm = nn.LayerNorm(dims)
            self.head = nn.Linear(dims, VOCAB, bias=False)

        def __call__(self, x):
            mask = nn.MultiHeadAttention.create_additive_causal_mask(x.shape[1])
            h = self.embed(x)
            for block in self.blocks:
                h = block(h, mask)
            return self.head(self.norm(h))

    return TinyGPT()


def torch_model(kind, params, cfg, device):
    """The PyTorch twin of :func:`mlx_model` on ``device``: model, loss function, batch."""
    import torch

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1000 + cfg["rank"])
    with torch.device(device):
        return _torch_build(kind, params, cfg, gen, device)


def _torch_build(kind, params, cfg, gen, device):
    import torch
    import torch.nn as tnn

    if kind == "mlp":
        width = mlp_width(params)
        layers = []
        for i in range(MLP_DEPTH):
            layers += [tnn.Linear(width, width)] + ([tnn.ReLU()] if i < MLP_DEPTH - 1 else [])
        model = tnn.Sequential(*layers)
        x = torch.randn(cfg["batch"], width, generator=gen, device="cpu")
        y = torch.randn(cfg["batch"], width, generator=gen, device="cpu")
        loss_fn = lambda out, y: tnn.functional.mse_loss(out, y)  # noqa: E731
    else:
        dims, layers, heads = transformer_shape(params)
        model = _torch_gpt(dims, layers, heads)
        x = torch.randint(0, VOCAB, (cfg["lm_batch"], cfg["seq"]), generator=gen, device="cpu")
        y = torch.randint(0, VOCAB, (cfg["lm_batch"], cfg["seq"]), generator=gen, device="cpu")
        loss_fn = lambda out, y: tnn.functional.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))  # noqa: E731
    return model.to(device), loss_fn, x.to(device), y.to(device)


def _torch_gpt(dims, layers, heads):
    import torch.nn as tnn

    class TinyGPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.embed = tnn.Embedding(VOCAB, dims)
            layer = tnn.TransformerEncoderLayer(dims, heads, 4 * dims, dropout=0.0, batch_first=True, norm_first=True)
            self.blocks = tnn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = tnn.LayerNorm(dims)
            self.head = tnn.Linear(dims, VOCAB, bias=False)

        def forward(self, x):
            mask = tnn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
            return self.head(self.norm(self.blocks(self.embed(x), mask=mask, is_causal=True)))

    return TinyGPT()
