"""SparK's sparse encoder over an unmodified registry convnet (docs/methods/spark.md,
step 2).

`SparseEncoder(backbone, backend)` runs the backbone's own modules (the same parameters and buffers,
so `backbone.net.state_dict()` is what gets exported) in a custom traversal of timm's ResNet and
ConvNeXt, and returns the four stage outputs with masked positions exactly zero.

Two backends implement the same primitive operations (`_MaskedOps`, `_SparseOps`); the traversals
(`_resnet_stages`, `_convnext_stages`) are written once against them:
- `masked`: the paper's simulation. Features are dense `[B, C, H, W]`; spatial ops (convs, pools)
  run dense and their output is multiplied by the mask; BatchNorm statistics come from the visible
  positions only (gather -> norm -> scatter).
- `sparse`: features are rows `[N_visible, C]` of the visible sites only. Ordinary convolutions
  read each output's neighbours from the rows: by one gather and one GEMM in torch (`gather`
  engine, any device) or in spconv (`spconv` engine) on the backbone's own weights; pointwise
  convs, Linear layers, norms and activations run on the rows; depthwise convs and max-pools (no
  sparse kernel) scatter to a dense map, run dense, and gather back.

A site is visible when its cell of the total-stride grid is; the input image is multiplied by the
mask upsampled to pixels. The backends agree to float rounding (tests/test_spark_parts.py).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.ssl.spark.masking import upsample_mask
from selfsup.ssl.spark.spconv_compat import apply_spconv_cpu_patch

BACKENDS = ("masked", "sparse")
CONV_ENGINES = ("gather", "spconv")


# --------------------------------------------------------------------------------------------------
# spconv: optional


@functools.cache
def spconv_or_reason() -> tuple[SimpleNamespace | None, str]:
    """(spconv's functional conv ops, "") or (None, why spconv cannot be used). Unpatched: the sparse
    backend applies spconv_compat's fixes before it runs them."""
    try:
        import spconv.pytorch.functional as functional
        import spconv.pytorch.ops as ops
        from spconv.core import ConvAlgo
        from spconv.cppconstants import CPU_ONLY_BUILD
    except Exception as error:  # not installed, or its compiled extension does not load here
        return None, f"spconv cannot be imported ({type(error).__name__}: {error})"
    spconv = SimpleNamespace(
        indice_pairs=ops.get_indice_pairs,
        subm_conv=functional.SubMConvFunction.apply,
        conv=functional.SparseConvFunction.apply,
        native=ConvAlgo.Native,
        cpu_only=bool(CPU_ONLY_BUILD),
    )
    return spconv, ""


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------------
# visible sites of each resolution


class SiteGrid:
    """The visible sites of one feature-map resolution. Sparse features hold one row per visible
    site, in row-major (b, y, x) order; everything a sparse op needs about the sites is cached here
    (indices, lookup table, spconv rulebooks), so it is built once per forward and resolution."""

    def __init__(self, mask: torch.Tensor, stride: int | None = None):
        self.mask = mask  # [B, 1, H, W] bool
        self.stride = stride  # relative to the input image, where a traversal needs it
        self.batch, _, self.height, self.width = mask.shape
        self._cache: dict = {}

    def cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def flat(self) -> torch.Tensor:
        """[N] long: b*H*W + y*W + x of each visible site."""
        return self.cached("flat", lambda: self.mask.reshape(-1).nonzero().squeeze(1))

    @property
    def num_sites(self) -> int:
        return self.flat.numel()

    @property
    def coords(self) -> torch.Tensor:
        """[N, 3] long (b, y, x)."""

        def build():
            pixel = self.flat % (self.height * self.width)
            return torch.stack([self.flat // (self.height * self.width), pixel // self.width, pixel % self.width], 1)

        return self.cached("coords", build)

    @property
    def spconv_indices(self) -> torch.Tensor:
        # spconv reads int32 and silently misreads anything not contiguous
        return self.cached("spconv_indices", lambda: self.coords.int().contiguous())

    @property
    def batch_of_row(self) -> torch.Tensor:
        return self.coords[:, 0]

    @property
    def row_lookup(self) -> torch.Tensor:
        """[B*H*W] long: the row of each site, -1 where masked."""

        def build():
            lookup = torch.full((self.batch * self.height * self.width,), -1, dtype=torch.long, device=self.mask.device)
            lookup[self.flat] = torch.arange(self.num_sites, device=self.mask.device)
            return lookup

        return self.cached("row_lookup", build)

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [N, C], the rows of the visible sites."""
        channels = dense.shape[1]
        if dense.is_contiguous(memory_format=torch.channels_last):
            return dense.permute(0, 2, 3, 1).reshape(-1, channels).index_select(0, self.flat)
        batch, pixel = self.coords[:, 0], self.flat % (self.height * self.width)
        return dense.flatten(2)[batch, :, pixel]

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, C] -> [B, C, H, W], zeros at masked sites; channels-last memory, where the rows
        are copied without a transpose."""
        channels = rows.shape[1]
        dense = rows.new_zeros(self.batch * self.height * self.width, channels).index_copy(0, self.flat, rows)
        return dense.view(self.batch, self.height, self.width, channels).permute(0, 3, 1, 2)


class VisibleSites:
    """The mask `active [B, 1, h, w]` of the total-stride grid, repeated to any stride on demand."""

    def __init__(self, active: torch.Tensor, total_stride: int):
        self.active = active
        self.total_stride = total_stride
        self._grids: dict[int, SiteGrid] = {}

    def at(self, stride: int) -> SiteGrid:
        if stride not in self._grids:
            if self.total_stride % stride:
                raise ValueError(f"stride {stride} does not divide the total stride {self.total_stride}")
            factor = self.total_stride // stride
            h, w = self.active.shape[-2:]
            self._grids[stride] = SiteGrid(upsample_mask(self.active, (h * factor, w * factor)), stride)
        return self._grids[stride]


@dataclass
class Features:
    """A feature map: `data` is dense `[B, C, H, W]` (masked backend, and the input image of the
    sparse one) or rows `[N, C]` of `grid`'s visible sites (sparse backend)."""

    data: torch.Tensor
    grid: SiteGrid
    dense: bool


# --------------------------------------------------------------------------------------------------
# primitive ops of the two backends


def _is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _is_channels_first_layer_norm(module: nn.Module) -> bool:
    from timm.layers import LayerNorm2d

    return isinstance(module, LayerNorm2d)


def _is_channels_last_layer_norm(module: nn.Module) -> bool:
    from timm.layers import LayerNorm

    return type(module) in (nn.LayerNorm, LayerNorm)


def batch_norm_rows(bn: nn.modules.batchnorm._BatchNorm, rows: torch.Tensor) -> torch.Tensor:
    """`bn` (a BatchNorm2d, with its parameters and running statistics) applied to rows `[N, C]` of
    visible sites, as BatchNorm1d would: statistics and running-statistics updates from these rows.

    Not `bn(rows[:, :, None, None])`: torch's CPU kernel on N one-pixel images is ~10x slower than
    on the same numbers as `[N, C]`. The bookkeeping below is `_BatchNorm.forward`'s."""
    if isinstance(bn, nn.SyncBatchNorm):  # its forward accepts [N, C] and reduces across ranks
        return bn(rows)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return F.batch_norm(
        rows,
        bn.running_mean if track else None,
        bn.running_var if track else None,
        bn.weight,
        bn.bias,
        use_batch_stats,
        momentum,
        bn.eps,
    )


def _is_norm(module: nn.Module) -> bool:
    return _is_batch_norm(module) or _is_channels_first_layer_norm(module) or _is_channels_last_layer_norm(module)


def _check_norm(module: nn.Module) -> None:
    if not _is_norm(module):
        raise NotImplementedError(f"SparK's sparse encoder has no sparse form of {type(module).__name__}")


def _drop_path_scale(module: nn.Module | None, batch: int, like: torch.Tensor) -> torch.Tensor | None:
    """Per-sample scale of stochastic depth, drawn as timm's DropPath draws it (same RNG use in both
    backends), or None where it does nothing."""
    if module is None or isinstance(module, nn.Identity):
        return None
    drop_prob = getattr(module, "drop_prob", None)
    if drop_prob is None:
        raise NotImplementedError(f"unknown drop-path module {type(module).__name__}")
    if drop_prob == 0.0 or not module.training:
        return None
    keep_prob = 1.0 - drop_prob
    scale = like.new_empty(batch).bernoulli_(keep_prob)
    if keep_prob > 0.0 and getattr(module, "scale_by_keep", True):
        scale.div_(keep_prob)
    return scale


def _dense_layout_for(module: nn.Module, dense: torch.Tensor) -> torch.Tensor:
    """The faster memory layout of a dense map for a depthwise conv on CPU. oneDNN's channels-last
    depthwise kernel is ~2x faster than NCHW on maps much larger than the kernel but ~3x slower
    when the map is hardly larger than it (ConvNeXt's last stage: 7x7 kernel on 7x7 maps)."""
    if dense.device.type != "cpu" or not isinstance(module, nn.Conv2d) or module.groups == 1:
        return dense
    small_map = min(dense.shape[-2:]) <= max(module.kernel_size)
    return dense.contiguous(memory_format=torch.contiguous_format if small_map else torch.channels_last)


class _MaskedOps:
    """Dense features; masking after every op that mixes sites (convs, pools, norm statistics).
    Per-site ops (activations, Linear, 1x1 convs in an MLP) cannot move values between sites, so
    they are left unmasked and the ConvNeXt block masks its branch once before the residual add."""

    def conv(self, conv: nn.Conv2d, x: Features, out_grid: SiteGrid) -> Features:
        return Features(conv(_dense_layout_for(conv, x.data)) * out_grid.mask, out_grid, True)

    pool = conv

    def norm(self, norm: nn.Module, x: Features) -> Features:
        _check_norm(norm)
        if _is_batch_norm(norm):
            rows = batch_norm_rows(norm, x.grid.gather(x.data))
            # back to NCHW, timm's layout: torch 2.14's oneDNN crashes (heap corruption) in the
            # backward of a 1x1 stride-2 conv on a channels-last map with 8 input channels, 64x64
            # or larger (resnet_tiny's first downsample at 64 px)
            return Features(x.grid.scatter(rows).contiguous(), x.grid, True)
        # a LayerNorm normalises each site alone: dense and then masked equals gather -> LN -> scatter
        if _is_channels_first_layer_norm(norm):
            return Features(norm(x.data) * x.grid.mask, x.grid, True)
        return Features(norm(x.data.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * x.grid.mask, x.grid, True)

    def linear(self, layer: nn.Module, x: Features) -> Features:
        if isinstance(layer, nn.Linear):
            return Features(layer(x.data.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), x.grid, True)
        return Features(layer(x.data), x.grid, True)  # 1x1 Conv2d

    def pointwise(self, fn, x: Features) -> Features:
        return Features(fn(x.data), x.grid, True)

    def scale_channels(self, x: Features, scale: torch.Tensor) -> Features:
        return Features(x.data * scale.view(1, -1, 1, 1), x.grid, True)

    def mask(self, x: Features) -> Features:
        return Features(x.data * x.grid.mask, x.grid, True)

    def drop_path(self, module: nn.Module | None, x: Features) -> Features:
        scale = _drop_path_scale(module, x.grid.batch, x.data)
        return x if scale is None else Features(x.data * scale.view(-1, 1, 1, 1), x.grid, True)

    def add(self, a: Features, b: Features) -> Features:
        return Features(a.data + b.data, a.grid, True)

    def to_dense(self, x: Features) -> torch.Tensor:
        return x.data


# --------------------------------------------------------------------------------------------------
# sparse convolutions: two engines over the same neighbour table


def _input_rows(in_grid: SiteGrid, out_grid: SiteGrid, conv: nn.Conv2d) -> torch.Tensor:
    """[N_out, kh*kw] long: for each visible output site and kernel offset ((ky, kx) row-major, as
    a weight (out, kh, kw, in) is laid out), the row of the input site it reads, -1 where that site
    is masked or off the map. Outputs are exactly `out_grid`'s sites: a strided conv creates no
    output at masked sites (spconv's own strided rulebook would, wherever a visible input reaches)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    device = out_grid.mask.device
    batch, y, x = out_grid.coords.unbind(1)
    in_y = (y * sh - ph).unsqueeze(1) + (torch.arange(kh, device=device) * dh).repeat_interleave(kw)
    in_x = (x * sw - pw).unsqueeze(1) + (torch.arange(kw, device=device) * dw).repeat(kh)
    inside = (in_y >= 0) & (in_y < in_grid.height) & (in_x >= 0) & (in_x < in_grid.width)
    in_y, in_x = in_y.clamp(0, in_grid.height - 1), in_x.clamp(0, in_grid.width - 1)
    flat = (batch.unsqueeze(1) * in_grid.height + in_y) * in_grid.width + in_x
    return torch.where(inside, in_grid.row_lookup[flat], -1)


def _gather_table(in_grid: SiteGrid, out_grid: SiteGrid, conv: nn.Conv2d) -> torch.Tensor:
    """[N_out * kh*kw]: `_input_rows` with N_in (a zero row appended to the input) for -1."""
    rows = _input_rows(in_grid, out_grid, conv)
    return torch.where(rows >= 0, rows, in_grid.num_sites).reshape(-1)


def _spconv_rulebook(in_grid: SiteGrid, out_grid: SiteGrid, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """spconv's (pairs [2, kh*kw, N_out] int32, counts [kh*kw] int32): per offset, the (input row,
    output row) pairs whose input is visible, first and in output order."""
    in_rows = _input_rows(in_grid, out_grid, conv).t()
    valid = in_rows >= 0
    order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)
    out_rows = torch.where(valid.gather(1, order), order, -1)
    pairs = torch.stack([in_rows.gather(1, order), out_rows]).int().contiguous()
    return pairs, valid.sum(1).int()


class _GatherConv(torch.autograd.Function):
    """A convolution over rows as one gather and one GEMM: the kh*kw input rows of every output
    (zeros where masked) side by side, times the weight as a (out, kh*kw*in) matrix. Few, large
    ops: on a CPU shared with other jobs, a loop of small ones (spconv's per-offset gather/GEMM/
    scatter) waits at every op for its threads. The backward gathers again instead of keeping the
    kh*kw-times larger matrix."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, num_out: int) -> torch.Tensor:
        ctx.save_for_backward(rows, weight, table)
        return _GatherConv.columns(rows, table, num_out) @ weight.t()

    @staticmethod
    def columns(rows: torch.Tensor, table: torch.Tensor, num_out: int) -> torch.Tensor:
        padded = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
        return padded.index_select(0, table).view(num_out, -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, weight, table = ctx.saved_tensors
        # under autocast the forward GEMM ran (and the gradient comes) in lower precision: run the
        # backward GEMMs in the gradient's dtype too (autograd casts the results back)
        grad = grad.contiguous()
        rows, weight = rows.to(grad.dtype), weight.to(grad.dtype)
        grad_weight = grad.t() @ _GatherConv.columns(rows, table, grad.shape[0])
        grad_columns = (grad @ weight).view(-1, rows.shape[1])
        grad_rows = grad.new_zeros(rows.shape[0] + 1, rows.shape[1]).index_add_(0, table, grad_columns)
        return grad_rows[:-1], grad_weight, None, None


class _SparseOps:
    """Rows of visible sites only; `conv_engine` ("gather" or "spconv") runs ordinary convs."""

    def __init__(self, conv_engine: str, spconv: SimpleNamespace | None = None):
        self.conv_engine = conv_engine
        self.spconv = spconv

    def conv(self, conv: nn.Conv2d, x: Features, out_grid: SiteGrid) -> Features:
        if x.dense:  # the image: a stem conv over 3 channels, cheapest dense
            return Features(out_grid.gather(conv(x.data)), out_grid, False)
        if conv.groups != 1 or type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
            # no sparse kernel for grouped/depthwise convs; subclasses (e.g. timm's dynamic "same"
            # padding) and non-zero padding have their own forward: run these on a dense map
            return self.pool(conv, x, out_grid)
        if conv.kernel_size == (1, 1) and conv.padding == (0, 0):
            out = self._pointwise_conv(conv, x, out_grid)
        elif self.conv_engine == "spconv":
            out = self._spconv(conv, x, out_grid)
        else:
            out = self._gather_conv(conv, x, out_grid)
        return Features(out, out_grid, False)

    def _pointwise_conv(self, conv: nn.Conv2d, x: Features, out_grid: SiteGrid) -> torch.Tensor:
        rows = x.data
        if conv.stride != (1, 1):
            # a strided 1x1 conv reads the top-left site of each output's window, which is visible
            # whenever the output is (the coarse mask is the fine one subsampled)
            rows = rows.index_select(0, self._subsampled_rows(x.grid, out_grid, conv.stride))
        return F.linear(rows, conv.weight.flatten(1), conv.bias)

    @staticmethod
    def _subsampled_rows(in_grid: SiteGrid, out_grid: SiteGrid, stride: tuple[int, int]) -> torch.Tensor:
        def build():
            batch, y, x = out_grid.coords.unbind(1)
            rows = in_grid.row_lookup[(batch * in_grid.height + y * stride[0]) * in_grid.width + x * stride[1]]
            if bool((rows < 0).any()):
                raise ValueError("a visible output site reads a masked input site: masks are not nested")
            return rows

        return out_grid.cached(("subsample", in_grid.stride, stride), build)

    @staticmethod
    def _geometry(conv: nn.Conv2d, x: Features) -> tuple:
        return (x.grid.stride, conv.kernel_size, conv.stride, conv.padding, conv.dilation)

    def _gather_conv(self, conv: nn.Conv2d, x: Features, out_grid: SiteGrid) -> torch.Tensor:
        table = out_grid.cached(("table", *self._geometry(conv, x)), lambda: _gather_table(x.grid, out_grid, conv))
        # (out, kh, kw, in) flattened matches the table's offset order; differentiable, so the
        # gradient lands on the backbone's own (out, in, kh, kw) weight
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
        out = _GatherConv.apply(x.data.contiguous(), weight, table, out_grid.num_sites)
        return out if conv.bias is None else out + conv.bias

    def _spconv(self, conv: nn.Conv2d, x: Features, out_grid: SiteGrid) -> torch.Tensor:
        sp = self.spconv
        # spconv's weight layout is (out, kh, kw, in)
        weight = conv.weight.permute(0, 2, 3, 1).contiguous()
        rows = x.data.to(weight.dtype).contiguous()
        (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
        same_size = conv.stride == (1, 1) and conv.padding == ((kh - 1) // 2 * dh, (kw - 1) // 2 * dw)
        if same_size and kh % 2 and kw % 2:  # submanifold: spconv's rulebook, outputs = inputs
            grid = x.grid

            def build():
                _, pairs, counts = sp.indice_pairs(
                    grid.spconv_indices, grid.batch, [grid.height, grid.width], sp.native,
                    [kh, kw], [1, 1], list(conv.padding), [dh, dw], [0, 0], subm=True,
                )
                return pairs, counts

            pairs, counts = grid.cached(("subm", kh, kw, dh, dw), build)
            out = sp.subm_conv(rows, weight, pairs, counts, grid.num_sites, sp.native)
        else:
            key = ("rulebook", *self._geometry(conv, x))
            pairs, counts = out_grid.cached(key, lambda: _spconv_rulebook(x.grid, out_grid, conv))
            out = sp.conv(rows, weight, pairs, counts, out_grid.num_sites, sp.native)
        # spconv's CPU kernels take no bias
        return out if conv.bias is None else out + conv.bias

    def pool(self, module: nn.Module, x: Features, out_grid: SiteGrid) -> Features:
        """Scatter -> dense op -> gather, for spatial ops without a sparse kernel."""
        dense = _dense_layout_for(module, x.grid.scatter(x.data))
        return Features(out_grid.gather(module(dense)), out_grid, False)

    def norm(self, norm: nn.Module, x: Features) -> Features:
        _check_norm(norm)
        if _is_batch_norm(norm):
            return Features(batch_norm_rows(norm, x.data), x.grid, False)
        if _is_channels_first_layer_norm(norm):  # sees the rows as N one-pixel images
            return Features(norm(x.data[:, :, None, None]).flatten(1), x.grid, False)
        return Features(norm(x.data), x.grid, False)

    def linear(self, layer: nn.Module, x: Features) -> Features:
        if isinstance(layer, nn.Conv2d):
            return Features(F.linear(x.data, layer.weight.flatten(1), layer.bias), x.grid, False)
        return Features(layer(x.data), x.grid, False)

    def pointwise(self, fn, x: Features) -> Features:
        return Features(fn(x.data), x.grid, False)

    def scale_channels(self, x: Features, scale: torch.Tensor) -> Features:
        return Features(x.data * scale, x.grid, False)

    def mask(self, x: Features) -> Features:
        return x  # masked sites do not exist here

    def drop_path(self, module: nn.Module | None, x: Features) -> Features:
        scale = _drop_path_scale(module, x.grid.batch, x.data)
        if scale is None:
            return x
        return Features(x.data * scale[x.grid.batch_of_row].unsqueeze(1), x.grid, False)

    def add(self, a: Features, b: Features) -> Features:
        return Features(a.data + b.data, a.grid, False)

    def to_dense(self, x: Features) -> torch.Tensor:
        return x.grid.scatter(x.data)


# --------------------------------------------------------------------------------------------------
# traversals of timm's ResNet and ConvNeXt


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(f"SparK's sparse encoder does not support {what}")


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _conv_stride(conv: nn.Conv2d) -> int:
    if conv.stride[0] != conv.stride[1]:
        raise _unsupported(f"a conv with unequal strides {conv.stride}")
    return conv.stride[0]


def _run_sequence(modules, ops, x: Features, sites: VisibleSites) -> Features:
    """A stem or a downsample layer: convs, norms and activations in order."""
    for module in modules:
        if isinstance(module, nn.Conv2d):
            x = ops.conv(module, x, sites.at(x.grid.stride * _conv_stride(module)))
        elif _is_norm(module):
            x = ops.norm(module, x)
        elif isinstance(module, (nn.ReLU, nn.GELU, nn.Identity)):
            x = ops.pointwise(module, x)
        else:
            raise _unsupported(f"{type(module).__name__} in a stem or downsample layer")
    return x


def _resnet_block(block: nn.Module, ops, x: Features, sites: VisibleSites) -> Features:
    if getattr(block, "se", None) is not None:
        raise _unsupported("squeeze-excitation blocks")
    if not (_is_identity(getattr(block, "aa", None)) and _is_identity(getattr(block, "drop_block", None))):
        raise _unsupported("anti-aliasing or DropBlock in a ResNet block")
    bottleneck = hasattr(block, "conv3")
    branch = [(block.conv1, block.bn1, block.act1), (block.conv2, block.bn2, block.act2 if bottleneck else None)]
    if bottleneck:
        branch.append((block.conv3, block.bn3, None))
    y = x
    for conv, norm, act in branch:
        y = ops.conv(conv, y, sites.at(y.grid.stride * _conv_stride(conv)))
        y = ops.norm(norm, y)
        if act is not None:
            y = ops.pointwise(act, y)
    y = ops.drop_path(block.drop_path, y)
    shortcut = x if block.downsample is None else _run_sequence(block.downsample, ops, x, sites)
    return ops.pointwise(block.act3 if bottleneck else block.act2, ops.add(y, shortcut))


def _resnet_stages(net: nn.Module, ops, image: Features, sites: VisibleSites) -> list[torch.Tensor]:
    if not isinstance(net.conv1, nn.Conv2d):
        raise _unsupported("deep (multi-conv) ResNet stems")
    x = _run_sequence([net.conv1, net.bn1, net.act1], ops, image, sites)
    if not _is_identity(net.maxpool):
        if not isinstance(net.maxpool, nn.MaxPool2d):
            raise _unsupported(f"a {type(net.maxpool).__name__} stem pool")
        x = ops.pool(net.maxpool, x, sites.at(x.grid.stride * net.maxpool.stride))
    stages = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in layer:
            x = _resnet_block(block, ops, x, sites)
        stages.append(ops.to_dense(x))
    return stages


def _convnext_block(block: nn.Module, ops, x: Features, sites: VisibleSites) -> Features:
    mlp = block.mlp
    if not all(hasattr(mlp, name) for name in ("fc1", "act", "fc2")) or not _is_identity(mlp.norm):
        raise _unsupported(f"a ConvNeXt MLP of type {type(mlp).__name__} (e.g. ConvNeXt-V2's GRN)")
    if not _is_identity(block.shortcut):
        raise _unsupported("a ConvNeXt block that changes width or stride")
    y = ops.conv(block.conv_dw, x, x.grid)
    y = ops.norm(block.norm, y)
    for layer in (mlp.fc1, mlp.act, mlp.drop1, mlp.fc2, mlp.drop2):
        y = ops.linear(layer, y) if isinstance(layer, (nn.Linear, nn.Conv2d)) else ops.pointwise(layer, y)
    if block.gamma is not None:
        y = ops.scale_channels(y, block.gamma)
    # masked sites picked up the LayerNorm's and the MLP's biases: zero them before the residual add
    y = ops.drop_path(block.drop_path, ops.mask(y))
    return ops.add(y, x)


def _convnext_stages(net: nn.Module, ops, image: Features, sites: VisibleSites) -> list[torch.Tensor]:
    x = _run_sequence(net.stem, ops, image, sites)
    stages = []
    for stage in net.stages:
        if not _is_identity(stage.downsample):
            x = _run_sequence(stage.downsample, ops, x, sites)
        for block in stage.blocks:
            x = _convnext_block(block, ops, x, sites)
        stages.append(ops.to_dense(x))
    return stages


def _traversal(net: nn.Module):
    from timm.models.convnext import ConvNeXt
    from timm.models.resnet import ResNet

    if isinstance(net, ResNet):
        return _resnet_stages
    if isinstance(net, ConvNeXt):
        return _convnext_stages
    raise _unsupported(f"backbones of type {type(net).__name__} (only timm ResNet and ConvNeXt)")


# --------------------------------------------------------------------------------------------------


def spconv_for(device: torch.device) -> tuple[SimpleNamespace | None, str]:
    """spconv's ops if they have kernels for `device`, else (None, why not)."""
    spconv, reason = spconv_or_reason()
    if spconv is not None and device.type == "cuda" and spconv.cpu_only:
        return None, "the installed spconv is a CPU-only build (GPUs need an spconv-cu12x package)"
    if spconv is not None and device.type not in ("cpu", "cuda"):
        return None, f"spconv has no kernels for {device.type} tensors"
    return spconv, reason


class SparseEncoder(nn.Module):
    """Runs `backbone` (a registry convnet, unmodified) on the visible cells of a mask only.

    forward(image [B, 3, H, W], active [B, 1, H/s, W/s] bool, s = total stride) -> the stage outputs
    `[B, C_i, H/s_i, W/s_i]`, exactly zero at masked positions.

    backend: "sparse" (visible sites only) or "masked" (the paper's dense simulation).
    conv_engine, for the sparse backend's ordinary convolutions: "gather" (torch: one gather and
    one GEMM per conv, any device; the faster one where measured, docs/results/spark.md) or
    "spconv" (spconv's kernels; where spconv cannot run on the device, one warning and "gather").
    """

    def __init__(self, backbone: nn.Module, backend: str = "sparse", conv_engine: str = "gather"):
        super().__init__()
        if getattr(backbone, "family", None) != "convnet":
            raise TypeError(f"SparK needs a convnet backbone, got family {getattr(backbone, 'family', None)!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if conv_engine not in CONV_ENGINES:
            raise ValueError(f"conv_engine must be one of {CONV_ENGINES}, got {conv_engine!r}")
        self.backbone = backbone
        self.backend = backend
        self.conv_engine = conv_engine
        self.total_stride = backbone.total_stride
        self.stage_channels = list(backbone.stage_channels)
        self.stage_strides = list(backbone.stage_strides)
        self._traverse = _traversal(backbone.net)

    def conv_engine_for(self, device: torch.device) -> str:
        """The engine that runs the sparse backend's convolutions on `device`."""
        if self.conv_engine == "spconv":
            spconv, reason = spconv_for(device)
            if spconv is not None:
                return "spconv"
            _warn_once(f"SparK: spconv unavailable ({reason}); sparse convolutions use the gather engine")
        return "gather"

    def _ops_for(self, device: torch.device):
        if self.backend == "masked":
            return _MaskedOps()
        engine = self.conv_engine_for(device)
        if engine == "gather":
            return _SparseOps(engine)
        apply_spconv_cpu_patch()
        return _SparseOps(engine, spconv_for(device)[0])

    def forward(self, image: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
        active = active.bool()
        h, w = active.shape[-2:]
        if tuple(image.shape[-2:]) != (h * self.total_stride, w * self.total_stride):
            raise ValueError(
                f"image {tuple(image.shape[-2:])} does not match a {h}x{w} mask at total stride {self.total_stride}"
            )
        sites = VisibleSites(active, self.total_stride)
        pixels = sites.at(1)
        masked_image = Features(image * pixels.mask, pixels, True)
        return self._traverse(self.backbone.net, self._ops_for(image.device), masked_image, sites)

    def extra_repr(self) -> str:
        return f"backend={self.backend}, conv_engine={self.conv_engine}, total_stride={self.total_stride}"
