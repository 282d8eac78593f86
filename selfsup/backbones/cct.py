"""Compact Convolutional Transformer (CCT; Hassani et al. 2021) as ConTraCon uses it (docs/methods/contracon.md).

A convolutional tokenizer (n x [conv k x k, stride 1, bias-free -> ReLU -> MaxPool(3, 2, 1)]), a fixed
sinusoidal position embedding, encoder layers `x += DropPath(Attn(LN_pre(x))); x = LN_1(x);
x += DropPath(MLP(x))` with bias-free Q, K, V and output projections, no class token, no final
LayerNorm, and sequence pooling (a softmax over tokens of Linear(D, 1)) as the pooled embedding.

The networks are registered in timm's registry as `selfsup_cct_*` (so an export loads with
`timm.create_model`), and in selfsup's registry (selfsup/backbones/zoo.py) as `cct_*`. They are built
through timm's `build_model_with_cfg` with a default pretrained config, so that
`timm.create_model("local-dir:FOLDER", pretrained=True)` loads a `submit export --format hf` folder.
Names follow CCT's: `cct_<layers>_<kernel>x<conv layers>`; `cct_6` is `cct_6_3x1` (CIFAR, 32 px ->
256 tokens); `cct_6_3x2` has two tokenizer convs (32 px -> 64 tokens, 4x fewer tokens for CPUs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn


class Tokenizer(nn.Module):
    def __init__(self, in_chans: int = 3, embed_dim: int = 256, kernel_size: int = 3, n_conv_layers: int = 1,
                 hidden_width: int = 64):
        super().__init__()
        widths = [in_chans] + [hidden_width] * (n_conv_layers - 1) + [embed_dim]
        layers = []
        for i in range(n_conv_layers):
            layers += [
                nn.Conv2d(widths[i], widths[i + 1], kernel_size, stride=1, padding=kernel_size // 2, bias=False),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            ]
        self.conv_layers = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, N, D]
        return self.conv_layers(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with separate bias-free Q, K, V projections (each [D, D], out x in;
    head h owns output rows h*d .. (h+1)*d-1) and a bias-free output projection."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.1, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (lin(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_drop: float, drop: float, drop_path: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm_pre = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm_pre(x)))
        x = self.norm1(x)
        return x + self.drop_path(self.drop(self.linear2(self.drop(F.gelu(self.linear1(x))))))


def sinusoidal_embedding(n_tokens: int, dim: int) -> torch.Tensor:
    pos = torch.arange(n_tokens, dtype=torch.float64)[:, None]
    i = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(i, 2, rounding_mode="floor") / dim)
    pe = torch.where(i.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return pe.float()[None]  # [1, N, D]


class CCT(nn.Module):
    """timm-style face: `num_features`, `forward_features(x) -> tokens [B, N, D]`,
    `forward_head(tokens, pre_logits=True) -> [B, D]` (sequence pooling), `head` (classifier)."""

    def __init__(self, img_size: int | tuple[int, int] = 32, in_chans: int = 3, num_classes: int = 0, embed_dim: int = 256,
                 depth: int = 6, num_heads: int = 4, mlp_ratio: float = 2.0, kernel_size: int = 3,
                 n_conv_layers: int = 1, attn_drop_rate: float = 0.1, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, **_):
        super().__init__()
        if not isinstance(img_size, int):  # timm passes (height, width) from a fixed-size pretrained config
            height, width = img_size
            if height != width:
                raise ValueError(f"CCT takes square images, not {height}x{width}")
            img_size = int(height)
        self.num_features = self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.img_size = img_size
        self.tokenizer = Tokenizer(in_chans, embed_dim, kernel_size, n_conv_layers)
        side = img_size
        for _ in range(n_conv_layers):
            side = (side + 2 - 3) // 2 + 1  # MaxPool(3, 2, 1)
        self.num_tokens = side * side
        self.register_buffer("pos_embed", sinusoidal_embedding(self.num_tokens, embed_dim), persistent=False)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]  # linear over layers
        self.blocks = nn.Sequential(*[
            EncoderLayer(embed_dim, num_heads, mlp_ratio, attn_drop_rate, drop_rate, rates[i]) for i in range(depth)
        ])
        self.attention_pool = nn.Linear(embed_dim, 1)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokenizer(x)
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(f"CCT built for {self.img_size} px ({self.num_tokens} tokens) got {tokens.shape[1]} tokens")
        return self.blocks(self.pos_drop(tokens + self.pos_embed))

    def forward_intermediates(self, x: torch.Tensor, indices=None, return_prefix_tokens: bool = False,
                              norm: bool = False, output_fmt: str = "NLC", intermediates_only: bool = True):
        """timm's face for the tokens `[B, N, D]` after the blocks at `indices` (all when None). A CCT has
        no prefix tokens and no norm after its blocks, so those options change nothing."""
        if output_fmt != "NLC" or not intermediates_only:
            raise ValueError("CCT gives its intermediates as tokens only (output_fmt='NLC', intermediates_only=True)")
        take = set(range(len(self.blocks)) if indices is None else indices)
        x = self.pos_drop(self.tokenizer(x) + self.pos_embed)
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in take:
                outs.append(x)
        return outs

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        weights = torch.softmax(self.attention_pool(x), dim=1)  # [B, N, 1]
        pooled = (weights.transpose(1, 2) @ x).squeeze(1)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cct(variant: str, pretrained: bool, depth: int, kernel_size: int, n_conv_layers: int, kwargs: dict,
         **defaults) -> CCT:
    return build_model_with_cfg(CCT, variant, pretrained, depth=depth, kernel_size=kernel_size,
                                n_conv_layers=n_conv_layers, **{**defaults, **kwargs})


# CCT-6/7 of ConTraCon: 256-d, 4 heads, MLP ratio 2
VARIANTS = {
    "cct_6_3x1": (6, 3, 1),  # CIFAR: 32 px -> 256 tokens (ConTraCon's CIFAR-100 model)
    "cct_6_3x2": (6, 3, 2),  # 32 px -> 64 tokens
    "cct_7_3x1": (7, 3, 1),  # 5-datasets
    "cct_7_3x2": (7, 3, 2),
    "cct_6_5x2": (6, 5, 2),  # TinyImageNet: 64 px -> 256 tokens
    "cct_6_3x3": (6, 3, 3),  # ImageNet-100: 224 px -> 784 tokens
}

# fixed input size: the sinusoidal position embedding has one row per token of the size built for.
# 32 px and a resize and centre crop of the whole image (selfsup's eval view); an export's config.json
# carries its run's own size and normalisation instead
default_cfgs = generate_default_cfgs({  # read by timm's register_model, so it comes before the registrations
    f"selfsup_{name}": {"num_classes": 0, "input_size": (3, 32, 32), "fixed_input_size": True, "crop_pct": 1.0,
                        "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
                        "first_conv": "tokenizer.conv_layers.0", "classifier": "head"}
    for name in (*VARIANTS, "cct_tiny_test")
})


def _make(name: str, depth: int, k: int, n: int):
    def fn(pretrained: bool = False, **kwargs):
        return _cct(f"selfsup_{name}", pretrained, depth, k, n, kwargs)

    fn.__name__ = f"selfsup_{name}"
    fn.__qualname__ = fn.__name__
    fn.__module__ = __name__
    return register_model(fn)


for _name, (_depth, _k, _n) in VARIANTS.items():
    globals()[f"selfsup_{_name}"] = _make(_name, _depth, _k, _n)


@register_model
def selfsup_cct_tiny_test(pretrained: bool = False, **kwargs):
    """tests: 2 layers, 32-d, 2 heads, one 3x3 conv (32 px -> 256 tokens)."""
    return _cct("selfsup_cct_tiny_test", pretrained, 2, 3, 1, kwargs, embed_dim=32, num_heads=2)

